"""The InternLM2 decoder of InternLM-XComposer-2.5, with its Partial-LoRA, written from the public description.

Parameter names follow the checkpoint (``model.layers.{i}.attention.wqkv``, ``feed_forward.w1/w2/w3``,
``attention_norm``, ``ffn_norm``, ``model.tok_embeddings``, ``model.norm``), so its tensors load by name.

- ``wqkv`` packs, for each of the ``n_kv`` key/value groups, the group's ``n_heads / n_kv`` query heads, then
  its key head, then its value head (``head_dim`` features each).
- Partial-LoRA: every linear layer of the decoder carries ``Plora_A`` (in → r) and ``Plora_B`` (r → out) applied
  only at image positions (``im_mask``): ``y = W x + s · B A x`` there, ``y = W x`` on text; ``s = alpha / r``.
- RMSNorm in float32; rotary embedding on the two halves of each head (``rotate_half``; θ = ``rotary_base``; with
  ``rotary_dynamic_factor = f`` θ grows as in dynamic NTK once a sequence is longer than
  ``max_position_embeddings``: θ · (f·L/max − (f − 1))^(d/(d−2)), from the longest position of the call).
  Attention goes through transformers' attention functions (``sdpa`` by default, ``eager`` defined here, or
  the selection stage's capture), with a key/value cache for generation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import rotate_half


class PartialLoRALinear(nn.Linear):
    """A bias-free linear layer whose low-rank update applies only where ``im_mask`` is True."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.Plora_A = nn.Linear(in_features, r, bias=False)
        self.Plora_B = nn.Linear(r, out_features, bias=False)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``W x``, plus the scaled low-rank update at the positions ``im_mask`` marks (none when it is None)."""
        out = super().forward(x)
        if im_mask is None:  # the model passes None when a batch has no image token (no device sync here)
            return out
        update = self.Plora_B(self.Plora_A(x[im_mask])) * self.scaling
        return out.index_put((im_mask,), out[im_mask] + update.to(out.dtype))


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, times a learned weight."""

    # Not transformers' LlamaRMSNorm: the same forward, but it casts x to float32 once, which changes bf16 gradients.
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` divided by its root mean square (in float32), cast back to its dtype, times ``weight``."""
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` at the angles whose cosines and sines are given."""
    return x * cos + rotate_half(x) * sin


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit softmax attention; ``attention_mask`` is boolean (True = may attend). Returns (B, L, H, D)."""
    key = key.repeat_interleave(module.num_key_value_groups, dim=1)
    value = value.repeat_interleave(module.num_key_value_groups, dim=1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


def attention_function(implementation: str | None) -> Any:
    """The attention function of ``implementation``: ours for eager (or None), transformers' for ``sdpa`` and
    ``miadpo_capture``; fails on any other."""
    if implementation in (None, "eager"):
        return eager_attention_forward
    if implementation in ("sdpa", "miadpo_capture"):
        return ALL_ATTENTION_FUNCTIONS[implementation]
    raise ValueError(f"InternLM-XC2.5: attn_implementation must be sdpa or eager, not {implementation!r}")


class Attention(nn.Module):
    """InternLM2 self-attention: packed ``wqkv``, rotary queries and keys, grouped key/value heads, ``wo``; both
    linears Partial-LoRA."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        packed = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        r, alpha = config.plora_r, config.plora_alpha
        self.wqkv = PartialLoRALinear(config.hidden_size, packed, r, alpha)
        self.wo = PartialLoRALinear(self.num_heads * self.head_dim, config.hidden_size, r, alpha)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                im_mask: torch.Tensor | None, cache: Any = None) -> torch.Tensor:
        """Self-attention output for ``x`` (B, L, hidden); the new keys and values go into ``cache`` when given."""
        batch, length, _ = x.shape
        group = self.num_key_value_groups
        qkv = self.wqkv(x, im_mask).view(batch, length, self.num_kv_heads, group + 2, self.head_dim)
        query = qkv[..., :group, :].reshape(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        key, value = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = attention_function(self.config._attn_implementation)
        out, _ = attend(self, query, key, value, mask, dropout=0.0, scaling=self.scaling)
        return self.wo(out.reshape(batch, length, -1), im_mask)


class FeedForward(nn.Module):
    """InternLM2's gated SiLU MLP (``w1`` gate, ``w3`` up, ``w2`` down), each a Partial-LoRA linear."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        r, alpha = config.plora_r, config.plora_alpha
        self.w1 = PartialLoRALinear(config.hidden_size, config.intermediate_size, r, alpha)  # gate
        self.w3 = PartialLoRALinear(config.hidden_size, config.intermediate_size, r, alpha)  # up
        self.w2 = PartialLoRALinear(config.intermediate_size, config.hidden_size, r, alpha)  # down

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        """``w2(silu(w1 x) · w3 x)``, with Partial-LoRA at ``im_mask``."""
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(GradientCheckpointingLayer):
    """One pre-norm decoder layer: attention, then feed-forward, each added to the residual stream."""

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(config, layer_idx)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                im_mask: torch.Tensor | None, past_key_values: Any = None) -> torch.Tensor:
        """``x`` after the attention and feed-forward blocks (each on the normed input, added back)."""
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, im_mask, past_key_values)
        return x + self.feed_forward(self.ffn_norm(x), im_mask)


def attention_mask_4d(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """(B, K) padding mask of all keys (cache + new tokens) → (B, 1, Q, K) boolean causal mask for the last
    ``query_length`` positions. A padding query attends to itself, so no row is empty (no NaN)."""
    keys = attention_mask.shape[1]
    past = keys - query_length
    query_pos = past + torch.arange(query_length, device=attention_mask.device)
    key_pos = torch.arange(keys, device=attention_mask.device)
    causal = key_pos[None, :] <= query_pos[:, None]
    mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
    return mask | (key_pos[None, :] == query_pos[:, None])[None, None]


class InternLM2Model(nn.Module):
    """Embeddings → decoder layers → final norm (``model.*`` in the checkpoint)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def rope_base(self, sequence_length: int) -> float:
        """θ, grown by dynamic NTK scaling beyond ``max_position_embeddings`` when the config asks for it.

        transformers' ``ROPE_INIT_FUNCTIONS["dynamic"]`` computes the same inverse frequencies bit for bit but does
        not expose θ and needs a ``rope_parameters`` config, so the formula stays here.
        """
        config, base = self.config, float(self.config.rotary_base)
        factor, limit = config.rotary_dynamic_factor, config.max_position_embeddings
        if factor and sequence_length > limit:
            dim = config.hidden_size // config.num_attention_heads
            base *= (factor * sequence_length / limit - (factor - 1)) ** (dim / (dim - 2))
        return base

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines of the rotary angles at ``position_ids``, (B, 1, L, head_dim) in ``dtype``."""
        dim = self.config.hidden_size // self.config.num_attention_heads
        base = self.rope_base(int(position_ids.max()) + 1)
        inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                im_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                past_key_values: Any = None) -> torch.Tensor:
        """``attention_mask`` covers the cached positions and the new ones, (B, past + L)."""
        batch, length, _ = inputs_embeds.shape
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past + length, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        mask = attention_mask_4d(attention_mask, length)
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, im_mask, past_key_values=past_key_values)
        return self.norm(hidden)

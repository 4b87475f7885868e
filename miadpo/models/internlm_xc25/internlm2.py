"""The InternLM2 decoder of InternLM-XComposer-2.5, with its Partial-LoRA, written from the public description.

Parameter names follow the checkpoint (``model.layers.{i}.attention.wqkv``, ``feed_forward.w1/w2/w3``,
``attention_norm``, ``ffn_norm``, ``model.tok_embeddings``, ``model.norm``, ``output``), so its safetensors
load by name.

- ``wqkv`` packs, for each of the ``n_kv`` key/value groups, the group's ``n_heads / n_kv`` query heads, then
  its key head, then its value head (``head_dim`` features each).
- Partial-LoRA: every linear layer of the decoder carries ``Plora_A`` (in → r) and ``Plora_B`` (r → out) applied
  only at image positions (``im_mask``): ``y = W x + s · B A x`` there, ``y = W x`` on text; ``s = alpha / r``.
- RMSNorm in float32; rotary embedding on the two halves of each head (θ = ``rope_theta``), positions from
  ``position_ids``; attention through ``scaled_dot_product_attention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class InternLM2Config:
    vocab_size: int = 92544
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    plora_r: int = 256
    plora_alpha: int = 256

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class PartialLoRALinear(nn.Linear):
    """A bias-free linear layer whose low-rank update applies only where ``im_mask`` is True."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: int) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.Plora_A = nn.Linear(in_features, r, bias=False)
        self.Plora_B = nn.Linear(r, out_features, bias=False)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if im_mask is None or not bool(im_mask.any()):
            return out
        update = self.Plora_B(self.Plora_A(x[im_mask])) * self.scaling
        return out.index_put((im_mask,), out[im_mask] + update)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        packed = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.wqkv = PartialLoRALinear(cfg.hidden_size, packed, cfg.plora_r, cfg.plora_alpha)
        self.wo = PartialLoRALinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, cfg.plora_r, cfg.plora_alpha)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                im_mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        batch, length, _ = x.shape
        group = cfg.num_heads // cfg.num_kv_heads
        qkv = self.wqkv(x, im_mask).view(batch, length, cfg.num_kv_heads, group + 2, cfg.head_dim)
        query = qkv[..., :group, :].reshape(batch, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        key, value = qkv[..., -2, :].transpose(1, 2), qkv[..., -1, :].transpose(1, 2)
        query, key = rotate(query, cos, sin), rotate(key, cos, sin)
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1), im_mask)


class FeedForward(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        r, alpha = cfg.plora_r, cfg.plora_alpha
        self.w1 = PartialLoRALinear(cfg.hidden_size, cfg.intermediate_size, r, alpha)  # gate
        self.w3 = PartialLoRALinear(cfg.hidden_size, cfg.intermediate_size, r, alpha)  # up
        self.w2 = PartialLoRALinear(cfg.intermediate_size, cfg.hidden_size, r, alpha)  # down

    def forward(self, x: torch.Tensor, im_mask: torch.Tensor | None) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x, im_mask)) * self.w3(x, im_mask), im_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                im_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, im_mask)
        return x + self.feed_forward(self.ffn_norm(x), im_mask)


class InternLM2Model(nn.Module):
    """Embeddings → decoder layers → final norm (``model.*`` in the checkpoint)."""

    def __init__(self, cfg: InternLM2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def rotary(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        dim = self.cfg.head_dim
        inv_freq = 1.0 / self.cfg.rope_theta ** (torch.arange(0, dim, 2, device=position_ids.device).float() / dim)
        angles = position_ids[..., None].float() * inv_freq
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B, 1, L, dim)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                im_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, _ = inputs_embeds.shape
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs_embeds.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        mask = mask | torch.eye(length, dtype=torch.bool, device=mask.device)  # padded rows attend to themselves
        hidden = inputs_embeds
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, mask, im_mask)
        return self.norm(hidden)

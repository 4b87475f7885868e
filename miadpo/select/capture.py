"""One decoder layer's attention, recorded while the model generates with its ordinary (SDPA / flash) kernels.

The chosen layer's attention module is switched to ``miadpo_capture``, an attention function that first runs
the model's own implementation (so the layer's output is unchanged) and keeps the newest query position's
query vector and the layer's keys. During generation the newest query at call k is the position that
produces answer token k+1 (the last prompt token at the prefill, then each generated token); afterwards
``softmax(q kᵀ · scale)`` of exactly those rows, averaged over heads, is what the reference read with
``output_attentions=True`` — without any other layer computing explicit weights and without a second pass.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from miadpo.models.base import ModelAdapter

CAPTURE_IMPLEMENTATION = "miadpo_capture"


@dataclass
class AttentionRecorder:
    """Keeps, per forward call, the newest query of the selection layer, and that layer's latest keys.

    Call k's newest query is the position that produces answer token k+1. The weights are computed only when
    asked for, per sample (``rows``), against the final keys, with the causal and padding masks applied —
    so generation itself pays for one small copy per step.
    """

    prompt_mask: torch.Tensor  # (B, P) 1 for prompt tokens, 0 for left padding
    queries: list[torch.Tensor] = field(default_factory=list)  # per call: (B, H, D)
    keys: torch.Tensor | None = None  # (B, H_kv, L, D) after RoPE, from the latest call
    scaling: float = 1.0

    def rows(self, sample: int, count: int, columns: torch.Tensor) -> torch.Tensor:
        """Heads-averaged attention of the first ``count`` rows of one sample on ``columns`` (prompt
        positions, left-padded coordinates): shape (count, len(columns))."""
        if count == 0 or self.keys is None:
            return torch.zeros((0, len(columns)))
        queries = torch.stack([q[sample] for q in self.queries[:count]], dim=1).float()  # (H, count, D)
        keys = self.keys[sample].float()  # (H_kv, L, D)
        heads, _, dim = queries.shape
        groups = keys.shape[0]
        scores = torch.einsum("grtd,gld->grtl", queries.reshape(groups, heads // groups, count, dim), keys)
        scores = scores.reshape(heads, count, -1) * self.scaling
        prompt = self.prompt_mask[sample].to(scores.device).bool()
        positions = torch.arange(scores.shape[-1], device=scores.device)
        visible = positions[None, :] < (prompt.numel() + torch.arange(count, device=scores.device))[:, None]
        visible &= torch.cat([prompt, positions.new_ones(scores.shape[-1] - prompt.numel(), dtype=torch.bool)])
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).mean(0)
        return probs[:, columns.to(probs.device)].cpu()


def _original_attention(module: nn.Module, implementation: str) -> Any:
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # "eager" is defined beside each model class.
    return sys.modules[type(module).__module__].eager_attention_forward


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    state = module._miadpo_capture  # type: ignore[attr-defined]
    output = state["original"](module, query, key, value, attention_mask, **kwargs)
    recorder: AttentionRecorder = state["recorder"]
    recorder.queries.append(query[:, :, -1].detach().clone())
    recorder.keys = key.detach()
    recorder.scaling = kwargs.get("scaling") or module.scaling  # type: ignore[attr-defined]
    return output


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


def resolve_layer(adapter: ModelAdapter, layer: int | None) -> int:
    """``None`` → the middle layer (16 of 32 for LLaVA-1.5-7B), or in a hybrid decoder the attention layer nearest it
    (the earlier of two); negative indices count from the end. A layer whose attention selection cannot read (a
    linear-attention layer has no weights, a sliding-window layer sees only its window) is refused, naming the
    ones it can."""
    count = len(adapter.decoder_layers())
    usable = adapter.attention_layer_indices()
    if layer is None:
        return min(usable, key=lambda i: (abs(i - count // 2), i))
    index = layer + count if layer < 0 else layer
    if not 0 <= index < count:
        raise ValueError(f"selection.layer={layer} is outside the model's {count} decoder layers")
    if index not in usable:
        raise ValueError(f"selection.layer={layer}: decoder layer {index} of {adapter.cfg.name} is a linear-attention "
                         f"or sliding-window layer, whose attention selection cannot read; layers it reads: {usable}")
    return index


@contextmanager
def capture_attention(adapter: ModelAdapter, layer: int, recorder: AttentionRecorder) -> Iterator[AttentionRecorder]:
    """Inside the block, every forward call records layer ``layer``'s newest-query attention in ``recorder``."""
    attention = adapter.attention_module(adapter.decoder_layers()[layer])
    original_config = attention.config
    config = copy.copy(original_config)
    # Only this config: a composite one (InternLM-XC2.5's) would otherwise pass it on to its vision sub-config.
    config._attn_implementation = {"": CAPTURE_IMPLEMENTATION}
    attention._miadpo_capture = {"original": _original_attention(attention, original_config._attn_implementation),
                                 "recorder": recorder}
    attention.config = config
    try:
        yield recorder
    finally:
        attention.config = original_config
        del attention._miadpo_capture


def sequence_ratio(column_attention: np.ndarray, spans: Sequence[tuple[int, int]], target: int
                   ) -> tuple[float, list[float]]:
    """Per-image score = mean attention over the image's tokens; ratio = score[target] / Σ scores.

    ``column_attention`` is the answer rows' mean attention on the concatenated image tokens; ``spans`` are
    each image's [start, end) inside that concatenation; ``target`` is 1-based.
    """
    scores = [float(column_attention[s:e].mean()) for s, e in spans]
    total = sum(scores)
    return (scores[target - 1] / total if total > 0 else 0.0), scores


def region_ratio(column_attention: np.ndarray, coverage: np.ndarray) -> float:
    """Attention on a region / attention on the whole image; ``coverage`` weights each token by how much of
    its cell lies inside the region (tiles and pasted boxes mapped through the model's preprocessing)."""
    total = float(column_attention.sum())
    return float((column_attention * coverage).sum()) / total if total > 0 else 0.0

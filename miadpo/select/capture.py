"""One decoder layer's attention, captured during an ordinary (SDPA / flash) forward, and the ratios built on it.

The chosen layer's attention module is switched to ``miadpo_capture``, an attention function that first runs
the model's own implementation (so the layer's output is unchanged) and then, for the requested query rows
only, computes ``softmax(q kᵀ · scale + mask)`` averaged over heads. No other layer computes explicit weights
and nothing of size layers × L × L is ever materialised.
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
class CaptureRequest:
    """Which rows and columns to keep, per sample of the batch being run."""

    rows: Sequence[tuple[int, int]]  # [start, end) query positions (the answer tokens)
    columns: Sequence[Sequence[tuple[int, int]]]  # key spans to keep (the image tokens), concatenated in order
    key_mask: torch.Tensor  # (B, L) 1 for real tokens, 0 for padding
    result: list[torch.Tensor] = field(default_factory=list)  # per sample (rows, kept columns), heads averaged


def _original_attention(module: nn.Module, implementation: str) -> Any:
    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    # "eager" is defined beside each model class.
    return sys.modules[type(module).__module__].eager_attention_forward


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    state = module._miadpo_capture  # type: ignore[attr-defined]
    output = state["original"](module, query, key, value, attention_mask, **kwargs)
    request: CaptureRequest | None = state["request"]
    if request is not None:
        scaling = kwargs.get("scaling") or module.scaling  # type: ignore[attr-defined]
        repeats = query.shape[1] // key.shape[1]
        length = key.shape[2]
        positions = torch.arange(length, device=query.device)
        for b, (start, end) in enumerate(request.rows):
            q = query[b, :, start:end].float()
            k = key[b].float().repeat_interleave(repeats, dim=0)
            scores = (q @ k.transpose(-1, -2)) * scaling
            allowed = request.key_mask[b].bool()[None, :] & (positions[None, :] <= positions[start:end, None])
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).mean(0)
            columns = torch.cat([positions[s:e] for s, e in request.columns[b]]) if request.columns[b] else \
                positions[:0]
            request.result.append(probs[:, columns].cpu())
    return output


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


def resolve_layer(adapter: ModelAdapter, layer: int | None) -> int:
    """``None`` → the middle layer (16 of 32 for LLaVA-1.5-7B); negative indices count from the end."""
    count = len(adapter.decoder_layers())
    index = count // 2 if layer is None else (layer + count if layer < 0 else layer)
    if not 0 <= index < count:
        raise ValueError(f"selection.layer={layer} is outside the model's {count} decoder layers")
    return index


@contextmanager
def capture_attention(adapter: ModelAdapter, layer: int, request: CaptureRequest) -> Iterator[CaptureRequest]:
    """Inside the block, forward passes record ``request``'s rows of layer ``layer`` (heads averaged)."""
    attention = adapter.attention_module(adapter.decoder_layers()[layer])
    original_config = attention.config
    config = copy.copy(original_config)
    config._attn_implementation = CAPTURE_IMPLEMENTATION
    attention._miadpo_capture = {"original": _original_attention(attention, original_config._attn_implementation),
                                 "request": request}
    attention.config = config
    try:
        yield request
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

"""InternLM-XComposer-2.5's vision path: CLIP ViT-L/14 at 560 px → 2 × 2 patch merge → separators → projector.

Checkpoint names: ``vit.vision_tower.*`` (transformers' CLIPVisionModel layout), ``vision_proj.0`` / ``.2``
(Linear, GELU, Linear), ``plora_glb_GN`` (1, 1, C) and ``plora_sub_GN`` (1, 1, 1, C), C = 4 × tower width.
The tower's last layer output (before ``post_layernorm``), class token dropped, is the feature map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from miadpo.models.internlm_xc25.hd import HDLayout


class VisionTower(nn.Module):
    """Holds the CLIP model under the checkpoint's ``vit.vision_tower`` path."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        return states[-1][:, 1:]


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, 40·40, C) → (N, 20, 20, 4C): each token concatenates a 2 × 2 block (top-left, top-right, bottom-left,
    bottom-right)."""
    n, patches, channels = features.shape
    side = int(patches**0.5)
    blocks = features.view(n, side // 2, 2, side // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, side // 2, side // 2, 4 * channels)


class VisionEncoder(nn.Module):
    """Crops of one or more images (global view first per image) → their token embeddings, one tensor per image."""

    def __init__(self, config: CLIPVisionConfig, hidden_size: int) -> None:
        super().__init__()
        width = 4 * config.hidden_size
        self.vit = VisionTower(config)
        self.vision_proj = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.plora_glb_GN = nn.Parameter(torch.zeros(1, 1, width))
        self.plora_sub_GN = nn.Parameter(torch.zeros(1, 1, 1, width))

    def layout_tokens(self, merged: torch.Tensor, layout: HDLayout) -> torch.Tensor:
        """(1 + rows·cols, 20, 20, C) of one image → its (tokens, C) sequence before projection."""
        cells, channels = merged.shape[1], merged.shape[-1]  # 20 cells per crop side at 560 px
        row_end = self.plora_sub_GN.view(1, 1, channels)
        global_view = torch.cat([merged[0], row_end.expand(cells, 1, channels)], dim=1).reshape(-1, channels)
        detail = merged[1:].view(layout.rows, layout.cols, cells, cells, channels).permute(0, 2, 1, 3, 4)
        detail = detail.reshape(layout.rows * cells, layout.cols * cells, channels)
        detail = torch.cat([detail, row_end.expand(detail.shape[0], 1, channels)], dim=1).reshape(-1, channels)
        return torch.cat([global_view, self.plora_glb_GN.view(1, channels), detail])

    def forward(self, pixel_values: torch.Tensor, layouts: Sequence[HDLayout]) -> list[torch.Tensor]:
        merged = merge_2x2(self.vit(pixel_values))
        out, start = [], 0
        for layout in layouts:
            count = 1 + layout.rows * layout.cols
            out.append(self.vision_proj(self.layout_tokens(merged[start : start + count], layout)))
            start += count
        return out

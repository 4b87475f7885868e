"""InternLM-XComposer-2.5's vision path: CLIP ViT-L/14 at 560 px → 2 × 2 patch merge → separators → projector.

Checkpoint names: ``vit.vision_tower.*`` (transformers' CLIPVisionModel layout), ``vision_proj.0`` / ``.2``
(Linear, GELU, Linear), ``plora_glb_GN`` (1, 1, C) and ``plora_sub_GN`` (1, 1, 1, C), C = 4 × tower width;
the model (``modeling.py``) holds them under those names. The tower's last layer output (before
``post_layernorm``), class token dropped, is the feature map.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel


class VisionTower(nn.Module):
    """Holds the CLIP model under the checkpoint's ``vit.vision_tower`` path."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionModel(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLIP tower's last-layer patch features, (N, patches, C), class token dropped."""
        # CLIP's last_hidden_state is the last layer's output; post_layernorm only touches the pooled token.
        return self.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]


def merge_2x2(features: torch.Tensor) -> torch.Tensor:
    """(N, 40·40, C) → (N, 20, 20, 4C): each token concatenates a 2 × 2 block (top-left, top-right, bottom-left,
    bottom-right)."""
    n, patches, channels = features.shape
    side = int(patches**0.5)
    blocks = features.view(n, side // 2, 2, side // 2, 2, channels).permute(0, 1, 3, 2, 4, 5)
    return blocks.reshape(n, side // 2, side // 2, 4 * channels)


def layout_tokens(merged: torch.Tensor, rows: int, cols: int, sub_gn: torch.Tensor, glb_gn: torch.Tensor
                  ) -> torch.Tensor:
    """(1 + rows·cols, cells, cells, C) merged views of one image (crop grid ``rows × cols``) → its (tokens, C)
    sequence before projection: the global view's rows each closed by ``sub_GN``, ``glb_GN``, the stitched
    crops' rows each closed by ``sub_GN``."""
    cells, channels = merged.shape[1], merged.shape[-1]
    row_end = sub_gn.reshape(1, 1, channels).to(merged.dtype)
    global_view = torch.cat([merged[0], row_end.expand(cells, 1, channels)], dim=1).reshape(-1, channels)
    detail = merged[1:].view(rows, cols, cells, cells, channels).permute(0, 2, 1, 3, 4)
    detail = detail.reshape(rows * cells, cols * cells, channels)
    detail = torch.cat([detail, row_end.expand(detail.shape[0], 1, channels)], dim=1).reshape(-1, channels)
    return torch.cat([global_view, glb_gn.reshape(1, channels).to(merged.dtype), detail])

"""The DPO optimizer: AdamW over the trainable parameters with a linear warm-up and decay (its settings' ranges:
``OptimConfig`` in ``miadpo/config.py``)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from miadpo.config import OptimConfig


def adamw_with_linear_schedule(model: nn.Module, optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    """AdamW over the trainable parameters; linear warm-up (``optim.warmup_ratio``) then linear decay to 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.freeze_* and model.lora")
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay, betas=tuple(optim.betas),
                                  eps=optim.eps)
    total = max(1, total_steps)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(optim.warmup_ratio * total), total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

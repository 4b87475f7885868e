"""The DPO optimizer: AdamW over the trainable parameters with a linear warm-up and decay, and its checks."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from miadpo.config import OptimConfig

FLOAT32_MAX = torch.finfo(torch.float32).max


def check_optim(optim: OptimConfig) -> None:
    """The ``optim.*`` settings AdamW and the schedule accept, checked before any stage runs (a bad one is named).

    ``optim.lr`` must also keep AdamW's largest step, ``lr / (1 - betas[0])`` (the first, bias-corrected one),
    within float32: beyond it the optimizer fails mid-run with an overflow that names no setting.
    """
    lr, betas = float(optim.lr), [float(b) for b in optim.betas]
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"optim.lr must be a finite number >= 0, got {optim.lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"optim.betas must be two numbers in [0, 1), got {list(optim.betas)}")
    if lr / (1 - betas[0]) > FLOAT32_MAX:
        raise ValueError(f"optim.lr={lr:g} is too large: AdamW's first step, optim.lr / (1 - optim.betas[0]) = "
                         f"{lr / (1 - betas[0]):.3g}, overflows float32 (max {FLOAT32_MAX:.3g}); DPO learning rates "
                         "are about 1e-6 to 1e-3")
    for name in ("eps", "weight_decay"):
        value = float(getattr(optim, name))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
    if not 0 <= float(optim.warmup_ratio) <= 1:
        raise ValueError(f"optim.warmup_ratio must be in [0, 1], got {optim.warmup_ratio}")


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

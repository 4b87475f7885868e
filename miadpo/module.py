"""Reference-model DPO as a LightningModule.

The forward pass lives in one object, ``pair_forward`` (batch of pairs → answer log-probs); the loss, the
data code and the logging never look inside it, so a faster forward can be swapped in.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning as L
import torch
from peft import PeftModel
from torch import nn
from transformers import get_linear_schedule_with_warmup

from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
from miadpo.losses import PairLogps, build_loss, rewards
from miadpo.models.base import ModelAdapter
from miadpo.pair_forward import (
    ConcatenatedPairForward,
    PairForward,
    SharedPrefixPairForward,
    shared_image_features,
)


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


def build_pair_forward(adapter: ModelAdapter, fast: FastPathConfig) -> PairForward:
    """The shared-prefix forward where it applies (no gradient checkpointing), else the plain one."""
    if fast.shared_prefix and not adapter.cfg.gradient_checkpointing:
        return SharedPrefixPairForward(adapter)
    return ConcatenatedPairForward()


class DPOModule(L.LightningModule):
    """Policy = ``adapter.model``; reference = the same network with LoRA disabled, or a frozen copy."""

    def __init__(self, adapter: ModelAdapter, dpo: DPOConfig, optim: OptimConfig,
                 pair_forward: PairForward | None = None, cached_reference: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self.policy = adapter.model
        self.dpo = dpo
        self.optim = optim
        self.loss_fn = build_loss(dpo)
        self.pair_forward = pair_forward or build_pair_forward(adapter, dpo.fast)
        self.plain_forward = ConcatenatedPairForward()
        cfg = adapter.cfg
        self.share_image_features = dpo.fast.shared_image_features and cfg.freeze_vision_tower and \
            cfg.freeze_projector
        self.cached_reference = cached_reference
        if isinstance(self.policy, PeftModel) or cached_reference:
            self.reference: nn.Module | None = None  # LoRA disabled, or log-probs from the cache: no copy
        else:
            self.reference = copy.deepcopy(self.policy).requires_grad_(False).eval()
        # Checkpoints hold trainable weights only; the frozen rest is rebuilt from the model config.
        self.strict_loading = False

    @contextmanager
    def _reference_model(self) -> Iterator[nn.Module]:
        if self.reference is not None:
            yield self.reference
            return
        was_training = self.policy.training
        self.policy.eval()
        try:
            with self.policy.disable_adapter():
                yield self.policy
        finally:
            self.policy.train(was_training)

    def _forward_for(self, batch: dict[str, Any]) -> PairForward:
        """The configured pair forward, or the plain one for a batch collated in the concatenated layout."""
        if "inputs" in batch and self.pair_forward.layout != "concatenated":
            return self.plain_forward
        return self.pair_forward

    def policy_logps(self, batch: dict[str, Any]) -> PairLogps:
        return self._forward_for(batch)(self.policy, batch)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any]) -> PairLogps:
        if "reference" in batch:  # cached before training (miadpo.reference_cache)
            cached = batch["reference"]
            return PairLogps(cached[:, 0], cached[:, 1], cached[:, 2].long(), cached[:, 3].long())
        if self.cached_reference:
            raise RuntimeError("dpo.fast.reference_cache is on but a batch came without cached reference log-probs")
        with self._reference_model() as reference:
            return self._forward_for(batch)(reference, batch)

    def _step(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        with shared_image_features(self.policy) if self.share_image_features else nullcontext():
            reference = self.reference_logps(batch)
            policy = self.policy_logps(batch)
        losses = self.loss_fn(policy, reference)
        loss = losses.mean()
        if self.dpo.sft_weight:
            sft = -policy.chosen.sum() / policy.chosen_tokens.sum().clamp(min=1)
            loss = loss + self.dpo.sft_weight * sft
            self.log(f"{prefix}sft_loss", sft.detach(), batch_size=batch["num_pairs"])
        chosen_rewards, rejected_rewards = rewards(policy, reference, self.dpo.beta)
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": policy.chosen.detach().mean(),
            "logps/rejected": policy.rejected.detach().mean(),
        }
        training = prefix == ""
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=batch["num_pairs"],
                      prog_bar=False, on_step=training, on_epoch=not training, sync_dist=not training)
        if training:
            self._log_throughput(batch["num_pairs"])
        return loss

    def _log_throughput(self, pairs: int) -> None:
        """Pairs per second over the last training step (this process), shown in the progress bar."""
        now = time.perf_counter()
        last = getattr(self, "_last_step_time", None)
        self._last_step_time = now
        if last is not None and self._trainer is not None:
            self.log("pairs_per_s", pairs / max(now - last, 1e-9), prog_bar=True, on_step=True, batch_size=pairs)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val/")

    def configure_model(self) -> None:
        """Under ``strategy=fsdp`` (Lightning's ModelParallelStrategy): shard every decoder layer, then the rest."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        data_parallel = mesh["data_parallel"]
        for layer in self.adapter.decoder_layers():
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.policy, mesh=data_parallel)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_linear_schedule(self.policy, self.optim, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}


"""Reference-model DPO as a LightningModule.

The forward pass lives in one object, ``pair_forward`` (batch of pairs → answer log-probs); the loss, the
data code and the logging never look inside it, so a faster forward can be swapped in.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
from miadpo.dpo.batch import ConcatenatedBatch, PairBatch, PairLogps
from miadpo.dpo.forward import ConcatenatedPairForward, PairForward, SharedPrefixPairForward
from miadpo.dpo.health import TrainingHealth
from miadpo.dpo.losses import AnchorLoss, ConditionalPreferenceLoss, build_loss
from miadpo.dpo.optim import adamw_with_linear_schedule
from miadpo.dpo.reference import Reference, computed_reference
from miadpo.export import nonfinite_names
from miadpo.models.base import ModelAdapter

log = logging.getLogger(__name__)


def build_pair_forward(adapter: ModelAdapter, fast: FastPathConfig) -> PairForward:
    """The shared-prefix forward where it applies (no gradient checkpointing, a family whose cache it can share),
    else the plain one."""
    if fast.shared_prefix and not adapter.shared_prefix_exact:
        if adapter.cfg.family not in _SAID_NO_SHARED_PREFIX:
            _SAID_NO_SHARED_PREFIX.add(adapter.cfg.family)
            log.warning("dpo.fast.shared_prefix: %s's linear-attention layers keep a recurrent state that the cache "
                        "cannot repeat per answer; this family uses the plain forward (the same log-probs, the "
                        "prompt run once per answer)", adapter.cfg.family)
        return ConcatenatedPairForward(adapter)
    if fast.shared_prefix and not adapter.cfg.gradient_checkpointing:
        return SharedPrefixPairForward(adapter)
    return ConcatenatedPairForward(adapter)


_SAID_NO_SHARED_PREFIX: set[str] = set()  # families whose fallback was logged (once per process)


def vision_path_is_frozen(adapter: ModelAdapter) -> bool:
    """Whether no parameter of the vision tower and projector trains (no LoRA there either): their features are
    then the same for the policy and the reference."""
    groups = adapter.module_groups()
    return not any(p.requires_grad for group in ("vision_tower", "projector") for p in groups[group].parameters())


class DPOModule(L.LightningModule):
    """Policy = ``adapter.model``; its reference log-probs come from ``reference`` (``miadpo.dpo.reference``; by
    default the policy with LoRA disabled, or a frozen copy of its starting weights). Training health is watched by
    the ``TrainingHealth`` callback the module brings (``configure_callbacks``), with the reference's own."""

    def __init__(self, adapter: ModelAdapter, dpo: DPOConfig, optim: OptimConfig,
                 pair_forward: PairForward | None = None, reference: Reference | None = None) -> None:
        super().__init__()
        self.adapter = adapter
        self.policy = adapter.model
        self.dpo = dpo
        self.optim = optim
        self.loss_fn = build_loss(dpo)
        self.conditional = ConditionalPreferenceLoss(dpo.beta) if dpo.conditional_weight else None
        self.anchor = AnchorLoss(dpo.beta, dpo.anchor_delta) if dpo.anchor_weight else None
        self.pair_forward = pair_forward or build_pair_forward(adapter, dpo.fast)
        self.plain_forward = ConcatenatedPairForward(adapter)
        self.share_image_features = dpo.fast.shared_image_features and vision_path_is_frozen(adapter)
        self.reference = reference if reference is not None else computed_reference(self.policy)
        self.health = TrainingHealth(optim.lr, dpo.beta, dpo.collapse_warning_nats)
        # Checkpoints hold trainable weights only; the frozen rest is rebuilt from the model config.
        self.strict_loading = False

    def _forward_for(self, batch: PairBatch) -> PairForward:
        """The configured pair forward, or the plain one for a batch another forward collated (a ConcatenatedBatch)."""
        if isinstance(batch, self.pair_forward.batch_type):
            return self.pair_forward
        if isinstance(batch, ConcatenatedBatch):
            return self.plain_forward
        raise TypeError(f"{type(self.pair_forward).__name__} cannot read a {type(batch).__name__}")

    def policy_logps(self, batch: PairBatch, image_features: Any | None = None) -> PairLogps:
        """The policy's answer log-probs of ``batch`` (with gradients), by the pair forward that reads it."""
        return self._forward_for(batch)(self.policy, batch, image_features)

    @torch.no_grad()
    def shared_image_features(self, batch: PairBatch) -> Any | None:
        """The batch's image features, computed once for the reference and the policy forward when the vision
        path is frozen (``dpo.fast.shared_image_features``); ``None`` lets each forward compute its own."""
        if not self.share_image_features:
            return None
        return self._forward_for(batch).image_features(self.policy, batch)

    def reference_logps(self, batch: PairBatch, image_features: Any | None = None) -> PairLogps:
        """The reference's answer log-probs of ``batch`` (``reference``; no gradient)."""
        return self.reference.logps(batch, self._forward_for(batch), image_features)

    def configure_callbacks(self) -> list[L.Callback]:
        """The ``TrainingHealth`` callback and the reference's own callbacks."""
        return [self.health, *self.reference.callbacks()]

    def _step(self, batch: PairBatch, prefix: str) -> torch.Tensor:
        features = self.shared_image_features(batch)
        reference = self.reference_logps(batch, features)
        policy = self.policy_logps(batch, features)
        text = self.loss_fn(policy, reference)
        loss = text.losses.mean()
        if self.conditional is not None or self.anchor is not None:
            loss = loss + self._image_terms(policy, reference, text.losses, prefix, batch.num_pairs)
        if self.dpo.sft_weight:
            sft = -policy.chosen_per_token()
            loss = loss + self.dpo.sft_weight * sft
            self.log(f"{prefix}sft_loss", sft.detach(), batch_size=batch.num_pairs)
        chosen_rewards, rejected_rewards = text.chosen_rewards, text.rejected_rewards
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
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=batch.num_pairs,
                      prog_bar=False, on_step=training, on_epoch=not training, sync_dist=not training)
        if training and self._trainer is not None:
            self.health.record(loss, policy, reference)
        return loss

    def _image_terms(self, policy: PairLogps, reference: PairLogps, text: torch.Tensor, prefix: str,
                     num_pairs: int) -> torch.Tensor:
        """The weighted conditional and anchor terms (``miadpo.dpo.losses``), each logged apart from the text term,
        with the chosen answer's rewards for the original and the negative images."""
        training = prefix == ""
        metrics = {"loss/text": text.detach().mean()}
        total = torch.zeros((), device=text.device, dtype=text.dtype)
        has = policy.has_negative
        if self.conditional is not None and has is not None and bool(has.any()):
            assert policy.negative is not None and reference.negative is not None
            terms = self.conditional(policy, reference)
            conditional = terms.losses[has].mean()
            total = total + self.dpo.conditional_weight * conditional
            original, negative = terms.chosen_rewards[has], terms.rejected_rewards[has]
            metrics |= {"loss/conditional": conditional.detach(), "rewards/chosen_original_images": original.mean(),
                        "rewards/chosen_negative_images": negative.mean(),
                        "rewards/image_margins": (original - negative).mean(),
                        "rewards/image_accuracies": (original > negative).float().mean()}
        if self.anchor is not None:
            anchor = self.anchor(policy, reference).losses.mean()
            total = total + self.dpo.anchor_weight * anchor
            metrics["loss/anchor"] = anchor.detach()
        self.log_dict({prefix + k: v for k, v in metrics.items()}, batch_size=num_pairs, on_step=training,
                      on_epoch=not training, sync_dist=not training)
        return total

    def training_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        """The batch's training loss (its metrics logged per step)."""
        return self._step(batch, "")

    def validation_step(self, batch: PairBatch, batch_idx: int) -> torch.Tensor:
        """The batch's validation loss (its metrics logged under ``val/``, per epoch)."""
        return self._step(batch, "val/")

    def configure_model(self) -> None:
        """Under ``strategy=fsdp`` (Lightning's ModelParallelStrategy): shard every decoder layer, then the rest."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        # The vision path's parameters sit in the root unit, gathered only inside the model's own forward: each
        # forward computes its image features (the model's get_image_features called alone would see shards).
        self.share_image_features = False
        data_parallel = mesh["data_parallel"]
        for layer in self.adapter.decoder_layers():
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.policy, mesh=data_parallel)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the policy's trainable parameters with a linear warm-up and decay."""
        return adamw_with_linear_schedule(self.policy, self.optim, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps only the trainable weights in the checkpoint; FloatingPointError (nothing written) when one is
        not finite."""
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        bad = nonfinite_names(checkpoint["state_dict"].items())
        if bad:  # raised before anything is written: no checkpoint with NaN weights
            step = checkpoint.get("global_step", self.trainer.global_step)
            raise FloatingPointError(self.health.nonfinite_message(
                f"the trainable weights are not finite ({len(bad)} tensors, e.g. {bad[0]}), so the checkpoint is "
                "refused", step))


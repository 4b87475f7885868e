"""Where a DPO step's reference log-probs come from, one object per kind.

- ``DisabledAdapterReference``: the policy with its LoRA adapters disabled (LoRA training: no copy is held).
- ``FrozenCopyReference``: a frozen copy of the policy's starting weights (full fine-tuning).
- ``CachedReference``: the log-probs of ``miadpo.dpo.reference_cache``; the pairs it lacks are computed by another
  reference and appended to it (``InStepFilling``), or, with every pair cached, no reference model exists at all.

``build_reference`` picks one; ``DPOModule`` only calls ``Reference.logps``.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import Any

import lightning as L
import torch
from peft import PeftModel
from torch import nn

from miadpo.dpo.batch import PairBatch, PairLogps
from miadpo.dpo.forward import PairForward
from miadpo.dpo.reference_cache import InStepFilling, ReferenceCache


class Reference(ABC):
    """The reference model's answer log-probs of a batch, never with a gradient."""

    @abstractmethod
    def logps(self, batch: PairBatch, forward: PairForward, image_features: Any | None = None) -> PairLogps:
        """Log-probs of ``batch`` by ``forward`` (the forward that reads the batch's type)."""

    def callbacks(self) -> list[L.Callback]:
        """The Lightning callbacks this reference needs in the Trainer (none by default)."""
        return []


class DisabledAdapterReference(Reference):
    """The policy with its adapters disabled and in eval mode (dropout off) for the forward."""

    def __init__(self, policy: PeftModel) -> None:
        self._policy = policy  # not a submodule: the LightningModule holds it as ``policy``

    @torch.no_grad()
    def logps(self, batch: PairBatch, forward: PairForward, image_features: Any | None = None) -> PairLogps:
        """Log-probs of ``batch`` by the policy with its adapters disabled, in eval mode."""
        policy = self._policy
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return forward(policy, batch, image_features)
        finally:
            policy.train(was_training)


class FrozenCopyReference(nn.Module, Reference):
    """A copy of the policy's starting weights, frozen and in eval mode (a submodule: it follows the device)."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.model = copy.deepcopy(policy).requires_grad_(False).eval()

    @torch.no_grad()
    def logps(self, batch: PairBatch, forward: PairForward, image_features: Any | None = None) -> PairLogps:
        """Log-probs of ``batch`` by the frozen copy."""
        return forward(self.model, batch, image_features)

    def train(self, mode: bool = True) -> FrozenCopyReference:
        """Stays in eval mode whatever Lightning sets (the reference has no dropout)."""
        return super().train(False)


class CachedReference(nn.Module, Reference):
    """Reference log-probs read from ``cache`` (served with the batch, or looked up by its pair keys). A pair the
    cache lacks is computed by ``compute`` and appended to the cache; without ``compute`` (every pair cached before
    training, or a reference that only the cache holds: ``dpo.reference_path``) it is an error. An ``nn.Module``, so
    that a frozen copy behind it is a submodule of the LightningModule and follows its device and precision."""

    def __init__(self, cache: ReferenceCache, compute: Reference | None = None) -> None:
        super().__init__()
        self.cache = cache
        self.compute = compute  # registered as a submodule when it is one (FrozenCopyReference)
        self.filling = InStepFilling(cache) if compute is not None else None

    @torch.no_grad()
    def logps(self, batch: PairBatch, forward: PairForward, image_features: Any | None = None) -> PairLogps:
        """The cached log-probs of ``batch``, else computed by ``compute`` (and appended to the cache)."""
        cached = batch.cached_reference()  # served with the pairs (PairDataset.attach_reference)
        if cached is None and batch.keys is not None:  # cached after the loader read the pairs
            cached = self.cache.lookup(batch.keys, batch.device, batch.has_negative)
        if cached is not None:
            return cached
        if self.compute is None:
            raise RuntimeError("a batch came without cached reference log-probs, and no reference model is held: "
                               "every pair was to be cached before training (dpo.fast.reference_cache, the pre-pass "
                               "of dpo.reference_path)")
        logps = self.compute.logps(batch, forward, image_features)
        if self.filling is not None and batch.keys is not None:
            self.filling.record(batch.keys, logps)
        return logps

    def callbacks(self) -> list[L.Callback]:
        """``InStepFilling`` where pairs are computed in the step (it closes the cache's shard at the end)."""
        return [self.filling] if self.filling is not None else []


def computed_reference(policy: nn.Module) -> DisabledAdapterReference | FrozenCopyReference:
    """The policy with LoRA disabled where it has LoRA, else a frozen copy of its starting weights."""
    return DisabledAdapterReference(policy) if isinstance(policy, PeftModel) else FrozenCopyReference(policy)


def build_reference(policy: nn.Module, cache: ReferenceCache | None = None, covers_all: bool = False,
                    only_cached: bool = False) -> Reference:
    """The reference of a run: the cache alone when it holds every pair (``covers_all``), the cache in front of a
    computed reference when it holds some, else the computed reference (``computed_reference``). With
    ``only_cached`` (the reference is other weights, ``dpo.reference_path``, that only the pre-pass ran) the policy
    never stands in for it: a pair the cache lacks is an error."""
    if only_cached:
        if cache is None or not covers_all:
            raise RuntimeError("dpo.reference_path: the reference's log-probs of some pairs are not cached, and the "
                               "policy cannot stand in for another model (the pre-pass fills the cache: "
                               "dpo.fast.reference_cache=true)")
        return CachedReference(cache)
    if cache is not None and covers_all:
        return CachedReference(cache)
    computed = computed_reference(policy)
    return CachedReference(cache, computed) if cache is not None else computed

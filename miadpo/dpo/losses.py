"""Preference losses over policy and reference log-probs of chosen (c) and rejected (r) answers.

Every text loss sees ``h = (log π(y_c) − log π(y_r)) − (log π_ref(y_c) − log π_ref(y_r))`` where log π(y) is the
sum of the answer tokens' log-probs (IPO: their mean, as the IPO paper defines it). Each returns a ``LossOutput``:
per-pair losses with the implicit rewards ``β (log π − log π_ref)`` of the summed log-probs beside them
(``implicit_reward``, the one place the formula is written), as torchtune's losses do. The image-side
terms (``ConditionalPreferenceLoss``, ``AnchorLoss``) are added to the text loss with ``dpo.conditional_weight`` and
``dpo.anchor_weight``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from miadpo.config import DPOConfig, LossType
from miadpo.dpo.batch import PairLogps


def _margin(policy: PairLogps, reference: PairLogps, average: bool = False) -> torch.Tensor:
    if average:
        pc, pr = policy.chosen / policy.chosen_tokens, policy.rejected / policy.rejected_tokens
        rc, rr = reference.chosen / reference.chosen_tokens, reference.rejected / reference.rejected_tokens
        return (pc - pr) - (rc - rr)
    return (policy.chosen - policy.rejected) - (reference.chosen - reference.rejected)


def implicit_reward(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward of an answer, ``β (log π(y) − log π_ref(y))`` (summed log-probs)."""
    return beta * (policy - reference)


class LossOutput(NamedTuple):
    """A loss's per-pair losses and the implicit rewards it compares (detached), each of shape (B,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # the chosen answer's
    rejected_rewards: torch.Tensor  # the rejected answer's (conditional loss: the chosen answer's with I′)


class PreferenceLoss(nn.Module, ABC):
    """Base of the losses below: maps (policy, reference) log-probs to per-pair losses with their rewards."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"dpo.beta must be a positive finite number, got {beta}")
        self.beta = beta

    def forward(self, policy: PairLogps, reference: PairLogps) -> LossOutput:
        """Per-pair losses and rewards of the batch."""
        chosen, rejected = self.rewards(policy, reference)
        return LossOutput(self.pair_losses(policy, reference), chosen.detach(), rejected.detach())

    def rewards(self, policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        """The implicit rewards of the chosen and the rejected answers."""
        return (implicit_reward(policy.chosen, reference.chosen, self.beta),
                implicit_reward(policy.rejected, reference.rejected, self.beta))

    @abstractmethod
    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """Per-pair losses, shape (B,)."""


class SigmoidDPOLoss(PreferenceLoss):
    """DPO (Rafailov et al. 2023): ``L = −log σ(β h)``."""

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``−log σ(β h)`` per pair."""
        return -F.logsigmoid(self.beta * _margin(policy, reference))


class ConservativeDPOLoss(PreferenceLoss):
    """cDPO, DPO with label smoothing ε: ``L = −(1−ε) log σ(β h) − ε log σ(−β h)``."""

    def __init__(self, beta: float, label_smoothing: float) -> None:
        super().__init__(beta)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.eps = label_smoothing

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``−(1−ε) log σ(β h) − ε log σ(−β h)`` per pair."""
        logits = self.beta * _margin(policy, reference)
        return -(1 - self.eps) * F.logsigmoid(logits) - self.eps * F.logsigmoid(-logits)


class RobustDPOLoss(ConservativeDPOLoss):
    """rDPO (Chowdhury et al. 2024), unbiased under label flips with rate ε:
    ``L = [−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)``."""

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``[−(1−ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)`` per pair."""
        logits = self.beta * _margin(policy, reference)
        return (-(1 - self.eps) * F.logsigmoid(logits) + self.eps * F.logsigmoid(-logits)) / (1 - 2 * self.eps)


class IPOLoss(PreferenceLoss):
    """IPO (Azar et al. 2023) on length-averaged log-probs: ``L = (h̄ − 1/(2β))²``."""

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``(h̄ − 1/(2β))²`` per pair, h̄ from the length-averaged log-probs."""
        return (_margin(policy, reference, average=True) - 1 / (2 * self.beta)) ** 2


class HingeLoss(PreferenceLoss):
    """SLiC-style hinge: ``L = max(0, 1 − β h)``."""

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``max(0, 1 − β h)`` per pair."""
        return torch.relu(1 - self.beta * _margin(policy, reference))


class ConditionalPreferenceLoss(PreferenceLoss):
    """mDPO's conditional preference (Wang et al. 2024, §3): the chosen answer y_c preferred with the original images I
    over the image-side negative I′ (the same prompt with the asked-about image changed), so that the answer's
    likelihood has to come from that image:
    ``L = −log σ(β[(log π(y_c|I) − log π_ref(y_c|I)) − (log π(y_c|I′) − log π_ref(y_c|I′))])``.
    Per pair; 0 for the pairs without a negative (``PairLogps.has_negative``). Its rewards are the chosen answer's
    with the original images and with the negative ones (0 without a negative)."""

    def rewards(self, policy: PairLogps, reference: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen answer's implicit rewards with I and with I′."""
        original = implicit_reward(policy.chosen, reference.chosen, self.beta)
        if policy.negative is None or reference.negative is None:
            return original, torch.zeros_like(original)
        return original, implicit_reward(policy.negative, reference.negative, self.beta)

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """The conditional preference loss per pair; 0 for the pairs without a negative."""
        if policy.negative is None or reference.negative is None or policy.has_negative is None:
            return torch.zeros_like(policy.chosen)
        original, negative = self.rewards(policy, reference)
        return torch.where(policy.has_negative, -F.logsigmoid(original - negative), torch.zeros_like(original))


class AnchorLoss(PreferenceLoss):
    """mDPO's reward anchor (Wang et al. 2024, §3): the chosen answer's implicit reward kept above δ, so that the
    preference terms cannot be won by lowering the chosen answer's likelihood:
    ``L = −log σ(β(log π(y_c|I) − log π_ref(y_c|I)) − δ)``."""

    def __init__(self, beta: float, delta: float) -> None:
        super().__init__(beta)
        if not math.isfinite(delta):
            raise ValueError(f"dpo.anchor_delta must be finite, got {delta}")
        self.delta = delta

    def pair_losses(self, policy: PairLogps, reference: PairLogps) -> torch.Tensor:
        """``−log σ(r_c − δ)`` per pair, r_c the chosen answer's implicit reward with the original images."""
        return -F.logsigmoid(implicit_reward(policy.chosen, reference.chosen, self.beta) - self.delta)


# Each ``dpo.loss`` value and how its loss is built; a value missing here is an error, never another loss.
LOSSES: dict[LossType, Callable[[DPOConfig], PreferenceLoss]] = {
    LossType.sigmoid: lambda cfg: SigmoidDPOLoss(cfg.beta),
    LossType.cdpo: lambda cfg: ConservativeDPOLoss(cfg.beta, cfg.label_smoothing),
    LossType.robust: lambda cfg: RobustDPOLoss(cfg.beta, cfg.label_smoothing),
    LossType.ipo: lambda cfg: IPOLoss(cfg.beta),
    LossType.hinge: lambda cfg: HingeLoss(cfg.beta),
}


def build_loss(cfg: DPOConfig) -> PreferenceLoss:
    """The loss ``dpo.loss`` names (``LOSSES``); ValueError for a value that maps to none."""
    loss = LossType(cfg.loss)
    if loss not in LOSSES:
        raise ValueError(f"dpo.loss={loss.value} has no loss in miadpo.dpo.losses.LOSSES")
    return LOSSES[loss](cfg)

"""Each loss against its published closed form, with numbers worked by hand.

Pair: policy log π(y_c) = −4 (2 tokens), log π(y_r) = −6 (3 tokens); reference −5 and −5.
h = (−4 + 6) − (−5 + 5) = 2. With β = 0.5: βh = 1.
  −log σ(1) = log(1 + e^−1) = 0.313261687518
  −log σ(−1) = log(1 + e) = 1.313261687518
Length-averaged (IPO): policy −2 and −2, reference −2.5 and −5/3 → h̄ = 0 − (−2.5 + 5/3) = 5/6.
"""

import math

import pytest
import torch

from miadpo.config import DPOConfig, LossType
from miadpo.dpo.batch import PairLogps
from miadpo.dpo.losses import build_loss, rewards

POLICY = PairLogps(torch.tensor([-4.0]), torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
REFERENCE = PairLogps(torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([2]), torch.tensor([3]))
NEG_LOGSIG_1 = 0.313261687518
NEG_LOGSIG_M1 = 1.313261687518


@pytest.mark.parametrize(
    ("loss", "beta", "eps", "expected"),
    [
        (LossType.sigmoid, 0.5, 0.0, NEG_LOGSIG_1),
        # cDPO: (1−ε)(−log σ(βh)) + ε(−log σ(−βh)) = 0.9·0.313262 + 0.1·1.313262
        (LossType.cdpo, 0.5, 0.1, 0.9 * NEG_LOGSIG_1 + 0.1 * NEG_LOGSIG_M1),
        # rDPO: [(1−ε)(−log σ(βh)) − ε(−log σ(−βh))] / (1−2ε) = (0.281936 − 0.131326) / 0.8 = 0.188262
        (LossType.robust, 0.5, 0.1, 0.188261687518),
        # IPO: (h̄ − 1/(2β))² = (5/6 − 1)² = 1/36
        (LossType.ipo, 0.5, 0.0, 1 / 36),
        # hinge: max(0, 1 − βh) with β = 0.25: 1 − 0.5
        (LossType.hinge, 0.25, 0.0, 0.5),
        (LossType.hinge, 0.5, 0.0, 0.0),
    ],
)
def test_loss_matches_closed_form(loss: LossType, beta: float, eps: float, expected: float) -> None:
    fn = build_loss(DPOConfig(loss=loss, beta=beta, label_smoothing=eps))
    value = fn(POLICY, REFERENCE)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_sigmoid_equals_cdpo_and_robust_without_noise() -> None:
    values = [build_loss(DPOConfig(loss=t, beta=0.5)).forward(POLICY, REFERENCE).item()
              for t in (LossType.sigmoid, LossType.cdpo, LossType.robust)]
    assert values == pytest.approx([NEG_LOGSIG_1] * 3)


def test_rewards_are_beta_scaled_log_ratios() -> None:
    chosen, rejected = rewards(POLICY, REFERENCE, beta=0.5)
    assert chosen.item() == pytest.approx(0.5)  # 0.5 · (−4 + 5)
    assert rejected.item() == pytest.approx(-0.5)  # 0.5 · (−6 + 5)


def test_loss_gradient_pushes_chosen_up() -> None:
    chosen = torch.tensor([-4.0], requires_grad=True)
    policy = PairLogps(chosen, torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
    build_loss(DPOConfig(beta=0.5))(policy, REFERENCE).sum().backward()
    # d/dx −log σ(β(x − c)) = −β σ(−βh) = −0.5 · σ(−1)
    assert chosen.grad.item() == pytest.approx(-0.5 / (1 + math.e))


def test_invalid_settings_fail() -> None:
    with pytest.raises(ValueError, match="beta"):
        build_loss(DPOConfig(beta=0.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss(DPOConfig(loss=LossType.robust, label_smoothing=0.5))


def test_every_loss_type_maps_to_its_own_loss_and_an_unknown_one_is_refused(monkeypatch) -> None:
    """``build_loss`` maps each ``dpo.loss`` value explicitly (it used to fall through to hinge for any value it did
    not know)."""
    from miadpo.dpo import losses

    built = {t: type(build_loss(DPOConfig(loss=t, beta=0.5, label_smoothing=0.1))).__name__ for t in LossType}
    assert built == {LossType.sigmoid: "SigmoidDPOLoss", LossType.cdpo: "ConservativeDPOLoss",
                     LossType.robust: "RobustDPOLoss", LossType.ipo: "IPOLoss", LossType.hinge: "HingeLoss"}
    monkeypatch.delitem(losses.LOSSES, LossType.ipo)  # as a new enum value without its loss would be
    with pytest.raises(ValueError, match=r"dpo\.loss=ipo has no loss"):
        build_loss(DPOConfig(loss=LossType.ipo, beta=0.5))

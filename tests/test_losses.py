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
from miadpo.dpo.losses import ConditionalPreferenceLoss, build_loss

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
    value = fn(POLICY, REFERENCE).losses
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, abs=1e-6)


def test_sigmoid_equals_cdpo_and_robust_without_noise() -> None:
    values = [build_loss(DPOConfig(loss=t, beta=0.5)).forward(POLICY, REFERENCE).losses.item()
              for t in (LossType.sigmoid, LossType.cdpo, LossType.robust)]
    assert values == pytest.approx([NEG_LOGSIG_1] * 3)


@pytest.mark.parametrize("loss", list(LossType))
def test_every_loss_returns_beta_scaled_log_ratios_as_its_rewards(loss: LossType) -> None:
    """Each loss returns its rewards beside its losses (torchtune's shape), from the summed log-probs, detached."""
    policy = PairLogps(torch.tensor([-4.0], requires_grad=True), torch.tensor([-6.0]), torch.tensor([4]),
                       torch.tensor([6]))
    out = build_loss(DPOConfig(loss=loss, beta=0.5, label_smoothing=0.1))(policy, REFERENCE)
    assert out.chosen_rewards.item() == pytest.approx(0.5)  # 0.5 · (−4 + 5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)  # 0.5 · (−6 + 5)
    assert not out.chosen_rewards.requires_grad and out.losses.requires_grad


def test_the_conditional_loss_rewards_the_chosen_answer_with_each_image_set() -> None:
    """Its rewards are the chosen answer's with the original and with the negative images (0 without one)."""
    policy = PairLogps(torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -6.0]), torch.tensor([4, 3]),
                       torch.tensor([6, 6]), negative=torch.tensor([-7.0, 0.0]),
                       has_negative=torch.tensor([True, False]))
    reference = PairLogps(torch.tensor([-5.0, -5.0]), torch.tensor([-5.0, -5.0]), torch.tensor([4, 3]),
                          torch.tensor([6, 6]), negative=torch.tensor([-6.0, 0.0]),
                          has_negative=torch.tensor([True, False]))
    out = ConditionalPreferenceLoss(0.5)(policy, reference)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 1.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.5, 0.0])
    assert out.losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))))  # −log σ(0.5 − (−0.5))
    assert out.losses[1].item() == 0.0


def test_loss_gradient_pushes_chosen_up() -> None:
    chosen = torch.tensor([-4.0], requires_grad=True)
    policy = PairLogps(chosen, torch.tensor([-6.0]), torch.tensor([2]), torch.tensor([3]))
    build_loss(DPOConfig(beta=0.5))(policy, REFERENCE).losses.sum().backward()
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

"""DPOModule: answer log-probs, the reference model, learning on fixed pairs, adapter round trip."""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import PROMPT_HEADERS, colour_image
from peft import PeftModel
from torch.utils.data import DataLoader

from miadpo.config import DPOConfig, OptimConfig
from miadpo.data.dataset import EncodedPair
from miadpo.dpo.batch import ConcatenatedBatch
from miadpo.dpo.forward import ConcatenatedPairForward, answer_logps
from miadpo.dpo.module import DPOModule
from miadpo.dpo.reference import DisabledAdapterReference, FrozenCopyReference
from miadpo.models import IGNORE_INDEX

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 210, 20),
           "purple": (140, 50, 180)}


def pair_item(adapter, n_images: int, index: int) -> EncodedPair:
    names = list(COLOURS)
    colours = [names[(index + k) % len(names)] for k in range(n_images)]
    images = adapter.process_images([colour_image((48 + 8 * k, 48), COLOURS[c]) for k, c in enumerate(colours)])
    target = 1 + index % n_images
    prompt = PROMPT_HEADERS[n_images] + f"In Image{target}, what colour is the square?"
    wrong = colours[target % n_images] if n_images > 1 else "black"
    return EncodedPair(f"p{index}", adapter.encode(images, prompt, f"The square is {colours[target - 1]}."),
                       adapter.encode(images, prompt, f"The square is {wrong} and large."))


def batch_of(adapter, image_counts: list[int]) -> ConcatenatedBatch:
    return ConcatenatedPairForward(adapter).collate([pair_item(adapter, n, i) for i, n in enumerate(image_counts)])


def direct_logp(model, sample) -> float:
    """Sum of log p(token_t | tokens_<t) over answer tokens, one sequence at a time, no padding."""
    inputs = {"input_ids": sample.input_ids[None], "attention_mask": torch.ones_like(sample.input_ids)[None],
              "pixel_values": sample.pixel_values}
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    total = 0.0
    for t in range(sample.prompt_length, sample.input_ids.numel()):
        total += torch.log_softmax(logits[t - 1], -1)[sample.input_ids[t]].item()
    return total


def test_summed_answer_logps_match_a_direct_per_token_computation(adapter) -> None:
    adapter.prepare_for_training()
    module = DPOModule(adapter, DPOConfig(), OptimConfig())
    counts = [1, 3, 5]
    items = [pair_item(adapter, n, i) for i, n in enumerate(counts)]
    batch = ConcatenatedPairForward(adapter).collate(items)
    with torch.no_grad():
        logps = module.policy_logps(batch)
    for row, item in enumerate(items):
        assert logps.chosen[row].item() == pytest.approx(direct_logp(adapter.model, item.chosen), abs=1e-4)
        assert logps.rejected[row].item() == pytest.approx(direct_logp(adapter.model, item.rejected), abs=1e-4)
        assert logps.chosen_tokens[row].item() == item.chosen.answer_length


def test_prompt_and_image_positions_contribute_nothing() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 50)
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 8:11] = torch.tensor([3, 4, 5])
    labels[1, 5:7] = torch.tensor([7, 8])
    base, counts = answer_logps(logits, labels, lambda rows: rows)  # the head: identity (rows are logits)
    assert counts.tolist() == [3, 2]
    noisy = logits.clone()
    noisy[0, :7] += 100 * torch.randn(7, 50)  # positions 0..6 predict prompt tokens of row 0
    noisy[0, 10:] += 100 * torch.randn(2, 50)  # position 10 predicts 11 (padding), 11 predicts nothing
    noisy[1, :4] += 100 * torch.randn(4, 50)
    noisy[1, 6:] += 100 * torch.randn(6, 50)
    assert torch.allclose(answer_logps(noisy, labels, lambda rows: rows)[0], base)
    expected = torch.log_softmax(logits[0, 7], -1)[3] + torch.log_softmax(logits[0, 8], -1)[4]
    expected += torch.log_softmax(logits[0, 9], -1)[5]
    assert base[0].item() == pytest.approx(expected.item(), abs=1e-6)


def optimise(module: DPOModule, batch: dict, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW([p for p in module.policy.parameters() if p.requires_grad], lr=lr)
    module.policy.train()
    for _ in range(steps):
        optimizer.zero_grad()
        policy = module.policy_logps(batch)
        module.loss_fn(policy, module.reference_logps(batch)).losses.mean().backward()
        optimizer.step()


@pytest.mark.parametrize("lora", [True, False])
def test_reference_is_unchanged_while_the_policy_moves(make_adapter, lora: bool) -> None:
    adapter = make_adapter(**{"lora": {"enabled": lora}})
    adapter.prepare_for_training()
    module = DPOModule(adapter, DPOConfig(), OptimConfig())
    assert isinstance(module.reference, DisabledAdapterReference if lora else FrozenCopyReference)
    module.train()  # as Lightning does at the start of fit: the frozen copy stays in eval mode (no dropout)
    assert lora or not module.reference.model.training
    batch = batch_of(adapter, [1, 3])
    ref_before, policy_before = module.reference_logps(batch), module.policy_logps(batch).detach()
    optimise(module, batch, steps=5, lr=1e-2)
    ref_after, policy_after = module.reference_logps(batch), module.policy_logps(batch).detach()
    assert torch.equal(ref_after.chosen, ref_before.chosen) and torch.equal(ref_after.rejected, ref_before.rejected)
    assert not torch.allclose(policy_after.chosen, policy_before.chosen)


def test_thirty_steps_on_fixed_pairs_reach_full_accuracy(adapter, tmp_path: Path) -> None:
    adapter.prepare_for_training()
    module = DPOModule(adapter, DPOConfig(beta=0.1), OptimConfig(lr=5e-3, warmup_ratio=0.0))
    items = [pair_item(adapter, n, i) for i, n in enumerate([2, 3, 4, 2])]
    loader = DataLoader(items, batch_size=4, collate_fn=ConcatenatedPairForward(adapter).collate)
    batch = next(iter(loader))
    before = module.reference_logps(batch)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    assert trainer.global_step == 30
    with torch.no_grad():
        policy = module.policy_logps(batch)
    reference = module.reference_logps(batch)
    assert torch.equal(reference.chosen, before.chosen)
    chosen_rewards = 0.1 * (policy.chosen - reference.chosen)
    rejected_rewards = 0.1 * (policy.rejected - reference.rejected)
    assert (chosen_rewards > rejected_rewards).all()
    assert (chosen_rewards - rejected_rewards).mean() > 0.5
    assert trainer.callback_metrics["rewards/accuracies"] == 1.0
    assert trainer.callback_metrics["rewards/margins"] > 0.5


def test_saved_adapter_reloaded_with_peft_reproduces_policy_logps(adapter, make_adapter, tmp_path: Path) -> None:
    adapter.save_base(tmp_path / "base")
    adapter.prepare_for_training()
    module = DPOModule(adapter, DPOConfig(), OptimConfig())
    batch = batch_of(adapter, [2, 5])
    optimise(module, batch, steps=3, lr=1e-2)
    adapter.model.save_pretrained(tmp_path / "adapter")
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy_logps(batch)

    reloaded = make_adapter(path=str(tmp_path / "base"))
    reloaded.model = PeftModel.from_pretrained(reloaded.model, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = DPOModule(reloaded, DPOConfig(), OptimConfig()).policy_logps(batch)
    assert torch.allclose(got.chosen, expected.chosen, atol=1e-5)
    assert torch.allclose(got.rejected, expected.rejected, atol=1e-5)
    assert not torch.allclose(got.chosen, module.reference_logps(batch).chosen)

"""The DPO fast path equals the plain concatenated path: log-probs, loss and gradients (fp32)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from miadpo.config import DPOConfig, FastPathConfig, OptimConfig
from miadpo.data.dataset import EncodedPair
from miadpo.dpo.batch import PairBatch
from miadpo.dpo.forward import ConcatenatedPairForward, SharedPrefixPairForward
from miadpo.dpo.module import DPOModule, build_pair_forward
from miadpo.models import build_adapter
from miadpo.train import CONFIG_DIR

FAMILIES = ["tiny_llava", "tiny_qwen2_vl", "tiny_internvl", "tiny_idefics3", "tiny_llava_onevision",
            "tiny_internlm_xc25", "tiny_qwen3_vl", "tiny_qwen3_vl_moe", "tiny_internvl3_5", "tiny_gemma3",
            "tiny_gemma4", "tiny_glm4v", "tiny_glm4v_moe"]
SIZES = [(64, 32), (40, 90), (48, 48), (90, 50), (30, 70)]


def adapter_for(name: str, **overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}"]).model
    cfg.merge_with(overrides)
    torch.manual_seed(0)
    adapter = build_adapter(cfg)
    adapter.prepare_for_training()
    for name_, parameter in adapter.model.named_parameters():  # LoRA B starts at 0: make the policy differ
        if ".lora_B" in name_:
            torch.nn.init.normal_(parameter, std=0.02)
    return adapter


def pairs(adapter, image_counts: list[int]) -> list[EncodedPair]:
    items = []
    for i, n in enumerate(image_counts):
        rng = np.random.default_rng(i)
        images = adapter.process_images([Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                                         for w, h in SIZES[:n]])
        prompt = "".join(f"Image{k}: <image>\n" for k in range(1, n + 1)) + f"What is in Image{1 + i % n}?"
        items.append(EncodedPair(f"p{i}", adapter.encode(images, prompt, "a red square " * (1 + i % 3)),
                                 adapter.encode(images, prompt, "blue")))
    return items


def step(module: DPOModule, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.policy.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("image_counts", [[1], [5], [2, 4, 1]])
def test_shared_prefix_equals_the_plain_path(name: str, image_counts: list[int]) -> None:
    adapter = adapter_for(name)
    items = pairs(adapter, image_counts)
    dpo = DPOConfig(sft_weight=0.5)
    plain = DPOModule(adapter, dpo, OptimConfig(), pair_forward=ConcatenatedPairForward(adapter))
    fast = DPOModule(adapter, dpo, OptimConfig(), pair_forward=SharedPrefixPairForward(adapter))
    plain_batch, fast_batch = plain.pair_forward.collate(items), fast.pair_forward.collate(items)
    a, b = plain.policy_logps(plain_batch), fast.policy_logps(fast_batch)
    assert torch.equal(a.chosen_tokens, b.chosen_tokens) and torch.equal(a.rejected_tokens, b.rejected_tokens)
    assert torch.allclose(a.chosen, b.chosen, atol=1e-5, rtol=1e-6)
    assert torch.allclose(a.rejected, b.rejected, atol=1e-5, rtol=1e-6)
    ref_a, ref_b = plain.reference_logps(plain_batch), fast.reference_logps(fast_batch)
    assert torch.allclose(ref_a.chosen, ref_b.chosen, atol=1e-5, rtol=1e-6)
    loss_a, grads_a = step(plain, plain_batch)
    loss_b, grads_b = step(fast, fast_batch)
    assert torch.allclose(loss_a, loss_b, atol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], atol=1e-5, rtol=1e-4), key


@pytest.mark.parametrize("forward_class", [ConcatenatedPairForward, SharedPrefixPairForward])
@pytest.mark.parametrize("name", ["tiny_llava", "tiny_internlm_xc25"])
def test_chunked_answer_logprobs_equal_the_whole_and_never_hold_all_logits(name: str, forward_class) -> None:
    """The LM head on 3 answer positions at a time gives the log-probs and gradients of the head on all at once;
    no logits tensor of more than 3 rows exists, in the forward or the backward pass."""
    adapter = adapter_for(name, freeze_llm=False, lora={"enabled": False})  # the head trains too
    items = pairs(adapter, [2, 4, 1])
    results = []
    for chunk in (0, 3):
        forward = forward_class(adapter, chunk=chunk)
        batch = forward.collate(items)
        shapes: list[tuple[int, ...]] = []
        head = adapter.base_model.get_output_embeddings()
        handle = head.register_forward_hook(lambda _m, _a, out, seen=shapes: seen.append(tuple(out.shape)))
        try:
            adapter.model.zero_grad()
            logps = forward(adapter.model, batch)
            (logps.chosen.sum() - logps.rejected.sum()).backward()
        finally:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in adapter.model.named_parameters() if p.grad is not None}
        results.append((logps, grads, shapes))
    (whole, whole_grads, _), (chunked, chunked_grads, shapes) = results
    assert torch.allclose(whole.chosen, chunked.chosen, atol=1e-5) and torch.allclose(whole.rejected,
                                                                                       chunked.rejected, atol=1e-5)
    assert whole_grads.keys() == chunked_grads.keys()
    assert any(n.endswith(("lm_head.weight", "output.weight")) for n in whole_grads)  # the head trains
    for key in whole_grads:
        assert torch.allclose(whole_grads[key], chunked_grads[key], atol=1e-5, rtol=1e-4), key
    rows = [math.prod(shape[:-1]) for shape in shapes]
    rows = [r for r in rows if r]  # the forwards' own logits are empty (logits_to_keep: no position)
    assert rows and max(rows) <= 3 and sum(rows) > int(whole.chosen_tokens.sum() + whole.rejected_tokens.sum())


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "tiny_idefics3", "tiny_internlm_xc25"])
def test_shared_image_features_run_the_tower_once_and_change_nothing(name: str) -> None:
    adapter = adapter_for(name)
    batch = SharedPrefixPairForward(adapter).collate(pairs(adapter, [2, 3]))
    tower = adapter.module_groups()["vision_tower"]
    calls = []
    handle = tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        alone = DPOModule(adapter, DPOConfig(fast=FastPathConfig(shared_image_features=False)), OptimConfig())
        loss_a, grads_a = step(alone, batch)
        separate = len(calls)
        calls.clear()
        shared = DPOModule(adapter, DPOConfig(), OptimConfig())
        loss_b, grads_b = step(shared, batch)
    finally:
        handle.remove()
    assert separate == 2 and len(calls) == 1
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for key in grads_a:
        assert torch.allclose(grads_a[key], grads_b[key], atol=1e-6), key


@pytest.mark.parametrize("overrides", [{"freeze_projector": False},
                                       {"lora": {"target_modules": r".*(q_proj|v_proj|linear_1)"}}])
def test_features_are_not_shared_when_the_vision_path_trains(overrides: dict) -> None:
    """A trainable projector, or LoRA reaching into the vision tower or projector, gives the policy other features."""
    adapter = adapter_for("tiny_llava", **overrides)
    assert not DPOModule(adapter, DPOConfig(), OptimConfig()).share_image_features


def replaced_methods(model: torch.nn.Module) -> list[str]:
    """Instance attributes that shadow a method of the module's class (a method patched on the live model)."""
    return [f"{name}.{key}" for name, module in model.named_modules() for key, value in vars(module).items()
            if callable(value) and callable(getattr(type(module), key, None))]


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "tiny_internlm_xc25"])
def test_no_model_method_is_replaced_at_run_time(name: str) -> None:
    """Shared image features are passed to the forwards (``mm_encoder_outputs``); the model is never patched, also
    not while the step runs (checked from inside the language model's forward)."""
    adapter = adapter_for(name)
    module = DPOModule(adapter, DPOConfig(), OptimConfig())
    assert module.share_image_features
    seen: list[list[str]] = []
    llm = adapter.module_groups()["llm"]
    handle = llm.register_forward_pre_hook(lambda *_: seen.append(replaced_methods(adapter.model)))
    try:
        step(module, module.pair_forward.collate(pairs(adapter, [2, 3])))
    finally:
        handle.remove()
    assert len(seen) == 4 and not any(seen)  # reference and policy: prefill and answers each
    adapter.base_model.get_image_features = lambda *a, **k: None  # the check itself sees a patch
    assert replaced_methods(adapter.model) == ["base_model.model.get_image_features"]


@pytest.mark.parametrize("name", ["tiny_qwen3_5", "tiny_qwen3_5_moe", "tiny_minicpm_v4_6"])
def test_hybrid_linear_attention_falls_back_to_the_plain_path_and_says_so_once(name: str, caplog) -> None:
    """Qwen3.5's linear-attention state (MiniCPM-V 4.6 runs the same decoder) cannot be repeated per answer row: the
    plain forward, one warning."""
    from miadpo.dpo import module as module_code

    adapter = adapter_for(name)
    module_code._SAID_NO_SHARED_PREFIX.discard(adapter.cfg.family)
    with caplog.at_level("WARNING", logger="miadpo.dpo.module"):
        forwards = [build_pair_forward(adapter, FastPathConfig()) for _ in range(3)]
    assert all(isinstance(f, ConcatenatedPairForward) for f in forwards)
    said = [r.message for r in caplog.records if "linear-attention" in r.message]
    assert len(said) == 1 and adapter.cfg.family in said[0]
    with pytest.raises(ValueError, match="linear-attention"):
        SharedPrefixPairForward(adapter)
    module = DPOModule(adapter, DPOConfig(sft_weight=0.5), OptimConfig())
    loss, grads = step(module, module.pair_forward.collate(pairs(adapter, [2, 1])))
    assert torch.isfinite(loss) and grads


def test_gradient_checkpointing_falls_back_to_the_plain_path() -> None:
    adapter = adapter_for("tiny_llava", gradient_checkpointing=True)
    module = DPOModule(adapter, DPOConfig(), OptimConfig())
    assert isinstance(module.pair_forward, ConcatenatedPairForward)


def test_a_batch_type_must_say_how_it_collates() -> None:
    """``PairBatch`` is an abstract base (as the losses are): a batch type without ``collate`` cannot be made."""
    class NoLayout(PairBatch):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoLayout(ids=["p0"])

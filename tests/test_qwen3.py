"""Qwen3-VL / Qwen3.5 rules beyond the zoo suites: LoRA on MoE experts, the think block of Qwen3.5's template."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from miadpo.config import DPOConfig, OptimConfig
from miadpo.data.dataset import EncodedPair
from miadpo.dpo.module import DPOModule
from miadpo.models import IGNORE_INDEX, ModelAdapter, build_adapter
from miadpo.train import CONFIG_DIR

EXPERTS = "[mlp.experts.gate_up_proj,mlp.experts.down_proj]"


def adapter_for(name: str, *overrides: str) -> ModelAdapter:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", *overrides]).model
    torch.manual_seed(0)
    adapter = build_adapter(cfg)
    adapter.prepare_for_training()
    return adapter


def one_pair(adapter: ModelAdapter) -> EncodedPair:
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 32), (40, 90)]]
    prompt = "Image1: <image>\nImage2: <image>\nWhat is in Image2?"
    images = adapter.process_images(pictures)
    return EncodedPair("p0", adapter.encode(images, prompt, "a red square"), adapter.encode(images, prompt, "blue"))


@pytest.mark.parametrize("name", ["tiny_qwen3_vl_moe", "tiny_qwen3_5_moe"])
def test_moe_lora_targets_linear_layers_by_default_and_experts_when_named(name: str) -> None:
    """Default: LoRA on the LLM's linear layers (attention, linear attention, shared expert); the fused routed
    experts and the router stay frozen. ``model.lora.target_parameters`` adds LoRA on the experts, which a DPO step
    then trains."""
    default = adapter_for(name)
    trainable = [n for n, p in default.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not [n for n in trainable if ".experts." in n or ".mlp.gate." in n]
    assert any(".self_attn.q_proj." in n for n in trainable)

    experts = adapter_for(name, f"model.lora.target_parameters={EXPERTS}")
    on_experts = {n: p.detach().clone() for n, p in experts.model.named_parameters()
                  if p.requires_grad and ".mlp.experts." in n}
    layers = experts.base_model.config.get_text_config().num_hidden_layers
    assert len(on_experts) == 4 * layers  # lora_A and lora_B for gate_up_proj and down_proj, per layer
    for parameter in experts.model.parameters():  # LoRA B starts at 0: make the policy differ
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    on_experts = {n: p.detach().clone() for n, p in experts.model.named_parameters() if n in on_experts}
    module = DPOModule(experts, DPOConfig(), OptimConfig())
    loss = module.training_step(module.pair_forward.collate([one_pair(experts)]), 0)
    loss.backward()
    grads = {n: p.grad for n, p in experts.model.named_parameters() if n in on_experts}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_qwen3_5_think_block_is_prompt_never_answer() -> None:
    """Non-thinking Qwen3.5: the generation prompt ends with an empty think block; the labels hold exactly the
    answer and <|im_end|>."""
    adapter = adapter_for("tiny_qwen3_5")
    sample = one_pair(adapter).chosen
    tokenizer = adapter.tokenizer
    prompt_text = tokenizer.decode(sample.input_ids[: sample.prompt_length])
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    answer = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert tokenizer.decode(answer) == "a red square<|im_end|>"
    assert int((sample.labels != IGNORE_INDEX).nonzero()[0]) == sample.prompt_length

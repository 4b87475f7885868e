"""The 2026 families' rules beyond the zoo suites: LoRA on MoE experts (Qwen3-VL, Qwen3.5, GLM-4.5V), the think
blocks of Qwen3.5's and GLM-4.5V's non-thinking templates."""

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


@pytest.mark.parametrize("name", ["tiny_qwen3_vl_moe", "tiny_qwen3_5_moe", "tiny_glm4v_moe"])
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
    routed = [layer for layer in experts.decoder_layers() if hasattr(layer.mlp, "experts")]  # GLM: first layer dense
    assert routed and len(on_experts) == 4 * len(routed)  # lora_A and lora_B for gate_up_proj and down_proj, per layer
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


# ----- the released Qwen vocabularies ------------------------------------------------------------------------------
# (model, vocabulary, its special ids: <|im_start|>, <|im_end|>, <|image_pad|>, <think>, </think>)
REAL_VOCABULARIES = [("qwen3_vl", "qwen3", (151644, 151645, 151655, 151667, 151668)),
                     ("qwen3_5", "qwen3_5", (248045, 248046, 248056, 248068, 248069))]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
CONVERSATION = [{"type": "text", "text": "Image1: "}, {"type": "image"}, {"type": "text", "text": "\nImage2: "},
                {"type": "image"}, {"type": "text", "text": "\nWhich image shows a dog?"}]
# The released chat templates' renderings of CONVERSATION with the generation prompt (Qwen3-VL-Instruct: no default
# system turn; Qwen3.5 with enable_thinking=false: an empty think block opens the answer).
RELEASED = {
    "qwen3_vl": f"<|im_start|>user\nImage1: {VISION}\nImage2: {VISION}\nWhich image shows a dog?<|im_end|>\n"
                "<|im_start|>assistant\n",
    "qwen3_5": f"<|im_start|>user\nImage1: {VISION}\nImage2: {VISION}\nWhich image shows a dog?<|im_end|>\n"
               "<|im_start|>assistant\n<think>\n\n</think>\n\n",
}


def real_vocab_adapter(name: str, vocabulary: str) -> ModelAdapter:
    """The tiny ``name`` architecture on the released vocabulary (its embedding and head sized to it)."""
    from qwen_vocab import qwen_tokenizer

    tiny = adapter_for(f"tiny_{name}")
    tokenizer = qwen_tokenizer(vocabulary)
    model = type(tiny).tiny_model(tiny.cfg.tiny, tokenizer, "sdpa")
    return type(tiny)(model, tokenizer, tiny.image_processor, tiny.template, tiny.cfg)


@pytest.mark.parametrize(("name", "vocabulary", "ids"), REAL_VOCABULARIES)
def test_released_vocabulary_renders_the_released_template_and_bounds_the_answer(name, vocabulary, ids, tmp_path
                                                                                  ) -> None:
    """On the real vocabulary: the exported chat template renders the released template's text; its ids (each image
    marker expanded) are miadpo's; the special tokens have their released ids; the labels are exactly the answer and
    <|im_end|> — the think block stays in the prompt."""
    from transformers import AutoTokenizer

    im_start, im_end, image_pad, think, end_think = ids
    adapter = real_vocab_adapter(name, vocabulary)
    assert len(adapter.tokenizer) == {"qwen3": 151669, "qwen3_5": 248077}[vocabulary]
    assert adapter.image_token_id == image_pad and adapter.eos_token_id == im_end
    adapter.save_base(tmp_path / "base")
    saved = AutoTokenizer.from_pretrained(tmp_path / "base")
    rendered = saved.apply_chat_template([{"role": "user", "content": CONVERSATION}], add_generation_prompt=True,
                                         tokenize=False)
    assert rendered == RELEASED[name]
    answered = saved.apply_chat_template([{"role": "user", "content": CONVERSATION},
                                          {"role": "assistant", "content": "Image2."}], tokenize=False)
    assert answered + "\n" == RELEASED[name] + "Image2.<|im_end|>\n"  # the released ends the turn with a newline

    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 32), (40, 90)]]
    prompt = "Image1: <image>\nImage2: <image>\nWhich image shows a dog?"
    sample = adapter.encode(pictures, prompt, "Image2.")
    geometries = adapter.plan_images([p.size for p in pictures])
    parts = rendered.split(VISION)
    expanded = parts[0] + "".join(adapter.image_placeholder(g) + part for g, part in zip(geometries, parts[1:]))
    ids_of_prompt = saved(expanded, add_special_tokens=False)["input_ids"]
    assert ids_of_prompt == sample.input_ids[: sample.prompt_length].tolist()
    assert ids_of_prompt[0] == im_start and ids_of_prompt.count(image_pad) == sum(g.num_tokens for g in geometries)
    answer = sample.input_ids[sample.labels != IGNORE_INDEX].tolist()
    assert answer == saved("Image2.", add_special_tokens=False)["input_ids"] + [im_end]
    if name == "qwen3_5":
        assert ids_of_prompt[-4:] == [think, 271, end_think, 271]  # "<think>", "\n\n", "</think>", "\n\n"
    else:
        assert think not in ids_of_prompt


@pytest.mark.parametrize(("name", "vocabulary", "ids"), REAL_VOCABULARIES)
def test_train_entry_on_the_released_vocabulary_from_a_weights_directory(name, vocabulary, ids, tmp_path,
                                                                         pair_files) -> None:
    """``python -m miadpo.train model=<weights config> model.path=<dir>`` on a directory laid out as the release's
    (the tiny architecture, the released vocabulary): 2 steps on a pair file of 1, 3 and 5 images."""
    from conftest import compose_train, good_record

    from miadpo.train import train

    real_vocab_adapter(name, vocabulary).save_base(tmp_path / "weights")
    pairs = pair_files([good_record(tmp_path, i, n) for i, n in enumerate([1, 3, 5, 1, 3, 5])])
    cfg = compose_train([f"model={name}", f"model.path={tmp_path / 'weights'}", "model.dtype=float32",
                         "model.gradient_checkpointing=false", "model.lora.r=8", "model.lora.alpha=16", "data=pairs",
                         f"data.pairs={pairs}", f"data.image_root={tmp_path / 'images'}", "data.batch_size=2",
                         "trainer.max_steps=2"], tmp_path)
    result = train(cfg)
    assert result.global_step == 2
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_glm4_5v_nothink_and_think_block_are_prompt_never_answer() -> None:
    """Non-thinking GLM-4.5V / 4.6V: the user turn ends with ``/nothink`` and the generation prompt with an empty
    think block; the labels hold exactly the answer and the ``<|user|>`` that ends it."""
    adapter = adapter_for("tiny_glm4v")
    sample = one_pair(adapter).chosen
    tokenizer = adapter.tokenizer
    # The tiny byte-level tokenizer gives text after a special token a prefix space: " \n" decodes back as such.
    prompt_text = tokenizer.decode(sample.input_ids[: sample.prompt_length]).replace(" \n", "\n")
    assert prompt_text.startswith("[gMASK]<sop><|user|>\n")
    assert prompt_text.endswith("What is in Image2?/nothink<|assistant|>\n<think></think>\n")
    answer = sample.input_ids[sample.labels != IGNORE_INDEX]
    assert tokenizer.decode(answer).lstrip() == "a red square<|user|>"  # the prefix space of the tiny tokenizer

"""Round trips through the tools users already have: transformers' processors and chat API, peft, and TRL's
``DPOTrainer`` on an exported tiny LLaVA and our ``trl.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train
from PIL import Image
from test_zoo import model_cfg
from transformers import AutoProcessor, LlavaForConditionalGeneration

from miadpo.data.pairs import BadRecordReport, ImageRoots, read_pairs
from miadpo.merge import merge_adapter
from miadpo.models import build_adapter
from miadpo.select.stage import write_exports
from miadpo.train import train

PROMPT = "Image1: <image>\nImage2: <image>\nIn Image2, what colour is the circle?"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """``miadpo.train`` (tiny LLaVA, LoRA, 2 steps) → base_model/, adapter/ and a merged/ directory."""
    tmp = tmp_path_factory.mktemp("exported")
    result = train(compose_train(["trainer.max_steps=2", "data.synthetic.num_pairs=16"], tmp))
    merged = merge_adapter(result.exported, tmp / "merged")
    return {"base_model": result.run_dir / "base_model", "adapter": result.exported, "merged": merged,
            "data": tmp / "data"}


def two_images() -> list[Image.Image]:
    """A wide and a tall image: pad-to-square and a centre crop give different pixels."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40, 90, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (70, 30, 3), dtype=np.uint8))]


def user_message(images: list[Image.Image]) -> list[dict]:
    """PROMPT as interleaved chat content blocks."""
    text = PROMPT.split("<image>")
    content: list[dict] = [{"type": "text", "text": text[0]}]
    for image, after in zip(images, text[1:]):
        content += [{"type": "image", "image": image}, {"type": "text", "text": after}]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("directory", ["base_model", "adapter", "merged"])
def test_exported_processor_and_chat_template_reproduce_miadpos_inputs(exported, directory) -> None:
    processor = AutoProcessor.from_pretrained(exported[directory])
    reference = build_adapter(model_cfg("tiny_llava"))  # the same deterministic tokenizer and image settings
    images = two_images()
    expected = reference.encode(images, PROMPT, "Blue.")
    inputs = processor.apply_chat_template(user_message(images), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == expected.input_ids[: expected.prompt_length].tolist()  # BOS included
    assert torch.equal(inputs["pixel_values"], expected.pixel_values)  # padded to square, not centre-cropped
    # The answer as TRL takes it: the conversation's text after the generation prompt, tokenized on its own
    # (miadpo tokenizes answers apart from prompts too) — the answer and its EOS.
    conversation = [*user_message(images), {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    prompt = processor.apply_chat_template(user_message(images), add_generation_prompt=True, tokenize=False)
    completion = processor.apply_chat_template(conversation, tokenize=False).removeprefix(prompt)
    assert completion == "Blue." + processor.tokenizer.eos_token
    ids = processor.tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert ids == expected.input_ids[expected.prompt_length :].tolist()


def test_transformers_pipeline_answers_as_miadpo_does(exported) -> None:
    """``pipeline("image-text-to-text")`` on a merged export: the same greedy answer as miadpo's generation."""
    from transformers import pipeline

    images = two_images()
    cfg = model_cfg("tiny_llava")
    cfg.path = str(exported["merged"])
    ours = build_adapter(cfg)
    expected = ours.generate_answers([ours.encode(images, PROMPT)], 4)[0]
    pipe = pipeline("image-text-to-text", model=str(exported["merged"]))
    output = pipe(text=user_message(images), generate_kwargs={"max_new_tokens": 4, "do_sample": False})
    answer = output[0]["generated_text"][-1]
    assert answer["role"] == "assistant" and answer["content"].strip() == expected.strip()


def test_the_adapter_records_a_base_path_that_resolves_from_anywhere(exported, tmp_path, monkeypatch) -> None:
    config = json.loads((exported["adapter"] / "adapter_config.json").read_text())
    base = Path(config["base_model_name_or_path"])
    assert base.is_absolute() and base.samefile(exported["base_model"])
    monkeypatch.chdir(tmp_path)
    merge_adapter(exported["adapter"], tmp_path / "again")  # from another working directory
    assert (tmp_path / "again" / "chat_template.jinja").is_file()


def test_an_adapter_trained_on_a_relative_model_path_records_it_absolute(exported, tmp_path, monkeypatch) -> None:
    """As the default run does (``model.path=data/toyworld/base``)."""
    import shutil

    shutil.copytree(exported["base_model"], tmp_path / "weights" / "base")
    monkeypatch.chdir(tmp_path)
    result = train(compose_train(["trainer.max_steps=1", "data.synthetic.num_pairs=8", "model.path=weights/base"],
                                 tmp_path / "job"))
    base = json.loads((result.exported / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "weights" / "base").resolve())


def test_trl_dpo_trainer_fine_tunes_the_export_for_two_steps_on_our_trl_jsonl(exported, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    from trl import DPOConfig, DPOTrainer

    pairs_file = next(exported["data"].rglob("pairs.jsonl"))
    roots = ImageRoots(image_root=exported["data"], out_dir=exported["data"])
    write_exports(tmp_path, read_pairs(pairs_file, roots, BadRecordReport()), roots)
    rows = [json.loads(line) for line in (tmp_path / "trl.jsonl").read_text().splitlines()][:4]
    for row in rows:  # paths are relative to the directory of trl.jsonl
        row["images"] = [Image.open(tmp_path / path).convert("RGB") for path in row.pop("images")]
        row.pop("id")
    model = LlavaForConditionalGeneration.from_pretrained(exported["merged"])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-3, report_to="none", use_cpu=True, logging_steps=1, save_strategy="no",
                     max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=AutoProcessor.from_pretrained(exported["merged"]))
    trainer.train()
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())

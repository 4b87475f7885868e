"""Training faults: non-finite losses and weights, a collapsing policy, and job errors found before any stage runs."""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_train, model_config
from reliability import case

import miadpo.pipeline as pipeline_module
from miadpo.train import train

FAST = ["trainer.max_steps=4", "data.synthetic.num_pairs=8", "data.report_samples=0"]


def nonfinite_tensors(path: Path) -> list[str]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return [name for name, value in state.items() if not torch.isfinite(value).all()]


def assert_nothing_nonfinite_written(run_dir: Path) -> None:
    assert not (run_dir / "adapter").exists() and not (run_dir / "model").exists()
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").is_dir() else []:
        assert not nonfinite_tensors(checkpoint), checkpoint


@pytest.mark.parametrize(("overrides", "named"), [
    case("training", "nan-loss-from-huge-lr", "optim.lr=1e30 with gradient clipping off (gradient_clip_val=null)",
         "stops at the first non-finite loss or gradient (step, last finite loss, optim.lr and clipping named); "
         "no adapter and no checkpoint with NaN", ["optim.lr=1e30", "trainer.gradient_clip_val=null"], "optim.lr"),
    case("training", "nan-loss-from-huge-lr-clip-0", "optim.lr=1e30 with trainer.gradient_clip_val=0",
         "stops at the first non-finite loss or gradient (step, last finite loss, optim.lr and clipping named); "
         "no adapter and no checkpoint with NaN", ["optim.lr=1e30", "trainer.gradient_clip_val=0"], "optim.lr"),
    case("training", "nan-gradient-from-huge-beta", "dpo.beta=1e38 (β h overflows)",
         "stops at the first non-finite gradient (step and dpo.beta named); no adapter and no checkpoint with NaN",
         ["dpo.beta=1e38"], "dpo.beta"),
])
def test_a_non_finite_loss_stops_training_and_nothing_is_exported(tmp_path: Path, overrides: list[str],
                                                                  named: str) -> None:
    cfg = compose_train(FAST + ["checkpoint.every_n_train_steps=1", *overrides], tmp_path)
    with pytest.raises(FloatingPointError) as raised:
        train(cfg)
    message = str(raised.value)
    assert "step " in message and named in message and "last finite loss" in message
    assert "trainer.gradient_clip_val" in message and "trainer.precision" in message
    assert_nothing_nonfinite_written(tmp_path / "run")


class PoisonAt(L.Callback):
    """Writes NaN into one trainable weight after the last step (as an optimizer step gone wrong would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("nan"))


@pytest.mark.parametrize("overrides", [
    case("checkpoints", "nan-weights-at-checkpoint", "trainable weights become NaN right before a checkpoint",
         "the checkpoint is refused (the non-finite tensor is named); no checkpoint with NaN, no adapter", []),
    case("training", "nan-weights-at-export", "trainable weights are NaN when training ends (checkpoints off)",
         "the export is refused (the non-finite tensor is named); no adapter written",
         ["checkpoint.save_last=false", "checkpoint.save_top_k=0"]),
])
def test_non_finite_weights_are_never_written(tmp_path: Path, overrides: list[str]) -> None:
    cfg = compose_train(FAST + overrides, tmp_path)
    with pytest.raises(FloatingPointError, match="not finite.*lora_"):
        train(cfg, extra_callbacks=[PoisonAt(4)])
    assert_nothing_nonfinite_written(tmp_path / "run")


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny base that has learnt the synthetic answers (a random one is already near uniform output)."""
    tmp = tmp_path_factory.mktemp("base")
    result = train(compose_train(["model.lora.enabled=false", "dpo.sft_weight=1.0", "optim.lr=1e-2",
                                  "optim.warmup_ratio=0", "trainer.max_steps=30", "data.synthetic.num_pairs=24",
                                  "data.report_samples=0"], tmp))
    assert result.exported is not None and result.exported.name == "model"
    return result.exported


COLLAPSE = "below the reference's"


@pytest.mark.parametrize("lr", [
    case("training", "collapse-from-absurd-lr", "optim.lr=1e10: finite weights, output collapses to uniform",
         "one warning with the step: the policy's log-prob per chosen token fell more than dpo.collapse_warning_nats "
         "below the reference's (optim.lr named); none on a default run", "1e10"),
])
def test_a_collapsing_policy_is_warned_about_once(tmp_path: Path, caplog, trained_base: Path, lr: str) -> None:
    common = ["trainer.max_steps=8", "data.synthetic.num_pairs=24", "data.report_samples=0"]
    with caplog.at_level(logging.WARNING, logger="miadpo"):
        train(compose_train(common, tmp_path / "default"))
        train(compose_train(common + [f"model.path={trained_base}"], tmp_path / "default_trained"))
    assert not [r for r in caplog.records if COLLAPSE in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="miadpo"):
        train(compose_train(common + [f"model.path={trained_base}", f"optim.lr={lr}"], tmp_path / "absurd"))
    warnings = [r.getMessage() for r in caplog.records if COLLAPSE in r.getMessage()]
    assert len(warnings) == 1 and "step " in warnings[0] and "optim.lr" in warnings[0], warnings


@pytest.fixture
def nothing_expensive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model, selection and reference pass must not start: each raises if called."""

    def forbidden(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the job was validated")

    for name in ("build_adapter", "run_selection", "fill_reference_cache", "ensure_toy_base", "ensure_toy_world"):
        monkeypatch.setattr(pipeline_module, name, forbidden)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed runs where CUDA is available")


@pytest.mark.parametrize(("overrides", "named"), [
    case("configuration", "unknown-trainer-argument", "+trainer.max_stepz=3",
         "error naming trainer.max_stepz before the model is built or any stage runs", ["+trainer.max_stepz=3"],
         "trainer.max_stepz"),
    case("configuration", "deepspeed-without-cuda", "strategy=deepspeed_zero2 on a machine without CUDA",
         "error naming the strategy and what to use, before any stage runs", ["strategy=deepspeed_zero2"],
         "strategy=deepspeed_zero2", marks=NO_CUDA),
    case("configuration", "beta-zero", "dpo.beta=0", "error naming dpo.beta before any stage runs",
         ["dpo.beta=0"], "dpo.beta"),
    case("configuration", "beta-negative", "dpo.beta=-1", "error naming dpo.beta before any stage runs",
         ["dpo.beta=-1"], "dpo.beta"),
    case("configuration", "label-smoothing-out-of-range", "dpo=cdpo with dpo.label_smoothing=0.5",
         "error naming dpo.label_smoothing before any stage runs", ["dpo=cdpo", "dpo.label_smoothing=0.5"],
         "dpo.label_smoothing"),
    case("configuration", "lr-overflows-float32", "optim.lr=1e38 (AdamW's first step overflows float32)",
         "error naming optim.lr before any stage runs", ["optim.lr=1e38"], "optim.lr"),
    case("configuration", "pip-scale-out-of-range", "data.augment.pip.scale=5 or -1 (target boxes outside the "
         "canvas)", "error naming data.augment.pip.scale and its range before anything is written",
         ["data.augment.pip.scale=5"], "data.augment.pip.scale=5.0 must be in (0, 1]"),
    case("configuration", "jpeg-quality-out-of-range", "data.augment.jpeg_quality=1000 or -5",
         "error naming data.augment.jpeg_quality and its range before anything is written",
         ["data.augment.jpeg_quality=-5"], "data.augment.jpeg_quality=-5 must be from 1 to 100"),
    case("configuration", "threshold-out-of-range", "an attention threshold of -0.5 or 7",
         "error naming selection.thresholds.<format>.<N> and its range before anything is written",
         ["selection.thresholds.grid.3=7"], "selection.thresholds.grid.3=7.0 must be an attention ratio"),
    case("configuration", "max-epochs-zero", "trainer.max_epochs=0 (exit 0, nothing trained)",
         "error naming trainer.max_epochs before anything is written", ["trainer.max_epochs=0"],
         "trainer.max_epochs=0 must be null, -1 (no limit) or at least 1"),
    case("configuration", "batch-size-zero", "data.batch_size=0 or -1", "error naming data.batch_size before "
         "anything is written (it was refused only after the base model and data report were written)",
         ["data.batch_size=0"], "data.batch_size=0 must be at least 1"),
    case("configuration", "val-fraction-one", "data.val_fraction=1.0", "error naming data.val_fraction before "
         "anything is written", ["data.val_fraction=1.0"], "data.val_fraction=1.0 must be from 0 to below 1"),
    case("configuration", "n-weights-all-zero", "data.augment.grid.n_weights all zero (an unnamed ValueError, and a "
         "manifest left that blocked the corrected rerun)", "error naming the weights before anything is written",
         [f"data.augment.grid.n_weights.{n}=0" for n in range(2, 10)], "data.augment.grid.n_weights="),
    (["data.augment.pip.scale=-1", "data.augment.jpeg_quality=1000", "selection.thresholds.sequence.2=-0.5"],
     "data.augment.jpeg_quality=1000 must be from 1 to 100; data.augment.pip.scale=-1.0 must be in (0, 1]: the "
     "target's size relative to the background; selection.thresholds.sequence.2=-0.5"),
    case("checkpoints", "missing-ckpt-path", "ckpt_path pointing at no file",
         "error naming ckpt_path and the path before any stage runs", ["ckpt_path=/nonexistent/last.ckpt"],
         "ckpt_path=/nonexistent/last.ckpt"),
])
def test_job_errors_come_before_any_stage_runs(tmp_path: Path, nothing_expensive, overrides: list[str],
                                               named: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        train(compose_train(FAST + overrides, tmp_path))
    assert named in str(raised.value)
    assert not (tmp_path / "run" / "base_model").exists() and not (tmp_path / "data").exists()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def corrupt_metadata(data: bytes) -> bytes:
    start = data.index(b"data.pkl")
    start = data.index(b"\x80\x02", start) + 5
    return data[:start] + bytes(255 - b for b in data[start:start + 60]) + data[start + 60:]


def garbage(data: bytes) -> bytes:
    return pickle.dumps({"not": "a checkpoint"}) + os.urandom(64)


@pytest.mark.parametrize("damage", [
    case("checkpoints", "truncated-ckpt", "ckpt_path is a truncated checkpoint (copy cut short)",
         "error naming the file: not a readable checkpoint (truncated or corrupt), before any stage runs; "
         "never a suggestion to set weights_only=False", truncated),
    case("checkpoints", "corrupt-ckpt", "ckpt_path is a checkpoint with corrupt bytes in its metadata",
         "error naming the file: not a readable checkpoint (truncated or corrupt), before any stage runs; "
         "never a suggestion to set weights_only=False", corrupt_metadata),
    case("checkpoints", "not-a-ckpt", "ckpt_path is some other file (a pickle followed by random bytes)",
         "error naming the file: not a readable checkpoint, before any stage runs", garbage),
    case("checkpoints", "empty-ckpt", "ckpt_path is an empty file",
         "error naming the file: not a readable checkpoint, before any stage runs", lambda data: b""),
])
def test_an_unreadable_checkpoint_is_named(tmp_path: Path, monkeypatch, damage) -> None:
    good = train(compose_train(["trainer.max_steps=2", "data.synthetic.num_pairs=8", "data.report_samples=0"],
                               tmp_path / "first")).checkpoint
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(damage(good.read_bytes()))

    def forbidden(*args, **kwargs):
        raise AssertionError("an expensive stage ran before the checkpoint was checked")

    monkeypatch.setattr(pipeline_module, "build_adapter", forbidden)
    with pytest.raises(ValueError) as raised:
        train(compose_train(FAST + [f"ckpt_path={bad}"], tmp_path / "resume"))
    message = str(raised.value)
    assert str(bad) in message and "not a readable" in message and "ckpt_path" in message
    assert "weights_only" not in message and raised.value.__cause__ is None
    assert not (tmp_path / "resume" / "run" / "base_model").exists()


@pytest.mark.parametrize(("entry", "schema", "override"), [
    ("augment", "AugmentJobConfig", "data.augment.sequence.n_weights.2=0"),
    ("select", "SelectJobConfig", "selection.thresholds.pip.1=1.5"),
])
def test_the_augment_and_select_entries_check_ranges_up_front(entry: str, schema: str, override: str) -> None:
    """The stand-alone entries run the same range check first (an all-zero n_weights left a manifest that blocked
    the corrected rerun)."""
    from hydra import compose, initialize_config_dir

    from miadpo import config as config_module
    from miadpo.train import CONFIG_DIR

    overrides = [override]
    if entry == "augment":
        overrides += [f"data.augment.sequence.n_weights.{n}=0" for n in range(3, 6)]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=entry, overrides=overrides)
    key = override.split("=")[0].rsplit(".", 1)[0] if entry == "augment" else override.split("=")[0]
    with pytest.raises(ValueError, match="settings out of range: " + key.replace(".", r"\.") + "="):
        config_module.check_keys(cfg, getattr(config_module, schema))


class NotATensor:
    """An object a weights-only unpickler refuses."""


@pytest.mark.parametrize("damage", [
    case("training", "weights-pickle-refused", "a weights directory whose pytorch_model.bin holds objects other than "
         "tensors (a raw UnpicklingError naming no file and suggesting weights_only=False)", "an error naming the "
         "directory and the .bin file; the unsafe flag is never suggested and never set", "pickle"),
    case("training", "weights-safetensors-bad-header", "a weights directory whose model.safetensors has a corrupt "
         "header (a raw SafetensorError naming no file)", "an error naming the .safetensors file, before training",
         "header"),
])
def test_unreadable_weight_files_are_named_and_never_loaded_unsafely(tmp_path: Path, damage: str) -> None:
    from miadpo.models import build_adapter

    weights = tmp_path / "weights"
    build_adapter(model_config()).save_base(weights)
    if damage == "pickle":
        (weights / "model.safetensors").unlink()
        torch.save({"language_model.lm_head.weight": NotATensor()}, weights / "pytorch_model.bin")
    else:
        data = (weights / "model.safetensors").read_bytes()
        (weights / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    cfg = model_config(name="llava15", path=str(weights))
    with pytest.raises(ValueError) as raised:
        build_adapter(cfg)
    message = str(raised.value)
    named = "pytorch_model.bin" if damage == "pickle" else str(weights / "model.safetensors")
    assert str(weights) in message and named in message and "weights_only" not in message
    assert raised.value.__cause__ is None or "weights_only=False" not in str(raised.value.__cause__)


@pytest.mark.parametrize("template", [
    case("checkpoints", "merge-foreign-adapter-template", "merge of an adapter whose folder holds another tool's "
         "tokenizer files and chat template (copied into merged/)", "merged/ gets the base's processor files, which "
         "carry miadpo's chat template", "FOREIGN {{ messages }}"),
])
def test_merge_writes_the_bases_chat_template_not_a_foreign_adapters(tmp_path: Path, template: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from miadpo.merge import merge_adapter
    from miadpo.models import build_adapter

    adapter = build_adapter(model_config())
    adapter.save_base(tmp_path / "base")
    policy = get_peft_model(adapter.model, PeftLoraConfig(r=2, target_modules=["q_proj"]))
    policy.save_pretrained(tmp_path / "adapter")
    foreign = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    (tmp_path / "adapter" / "tokenizer_config.json").write_text(json.dumps({**foreign, "chat_template": template}))
    (tmp_path / "adapter" / "chat_template.jinja").write_text(template)
    merged = merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=str(tmp_path / "base"))
    written = "".join(p.read_text() for p in merged.iterdir() if p.name in ("tokenizer_config.json",
                                                                           "chat_template.jinja"))
    assert "FOREIGN" not in written and adapter.chat_template().split("{{")[0] in written


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.safetensors"])
def test_internlm_xc25_weight_files_that_cannot_be_read_safely_are_named(tmp_path: Path, name: str) -> None:
    """The InternLM-XC2.5 loader (``--base`` of merge, model.path of internlm_xc25) reads weight files itself: the
    same named errors, never a suggestion to load unsafely."""
    from miadpo.models.internlm_xc25.checkpoint import read_tensors

    if name.endswith(".bin"):
        torch.save({"w": NotATensor()}, tmp_path / name)
    else:
        (tmp_path / name).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=rf"{name}: ") as raised:
        list(read_tensors(tmp_path))
    assert "weights_only" not in str(raised.value)

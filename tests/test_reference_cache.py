"""Cached reference log-probs: keys, hits and misses, and training that never runs the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train

from miadpo.dpo.module import DPOModule
from miadpo.train import train

FAST = ["trainer.max_steps=4", "data.synthetic.num_pairs=16", "data.batch_size=4", "data.val_fraction=0.25"]


def cached_rows(tmp_path: Path) -> dict[str, int]:
    """Lines per model-key directory of the reference cache."""
    root = tmp_path / "data" / "reference_logps"
    return {d.name: sum(len(f.read_text().splitlines()) for f in d.glob("logps.*.jsonl")) for d in root.iterdir()}


def test_second_run_and_beta_sweep_reuse_the_cache_other_models_miss(tmp_path: Path) -> None:
    train(compose_train(FAST, tmp_path))
    first = cached_rows(tmp_path)
    assert list(first.values()) == [16]  # every train and val pair, once
    train(compose_train(FAST + ["dpo.beta=0.3", "dpo=ipo", f"run_dir={tmp_path / 'run2'}"], tmp_path))
    assert cached_rows(tmp_path) == first  # nothing recomputed
    train(compose_train(FAST + ["model.template=plain", f"run_dir={tmp_path / 'run3'}"], tmp_path))
    assert sorted(cached_rows(tmp_path).values()) == [16, 16]  # another template: another model key


def test_a_changed_pair_misses_only_itself(tmp_path: Path, pair_files) -> None:
    from conftest import good_record

    records = [good_record(tmp_path, i) for i in range(6)]
    pairs = pair_files(records)
    overrides = FAST + [f"data.pairs={pairs}", f"data.image_root={tmp_path / 'images'}", "data.val_fraction=0"]
    train(compose_train(overrides, tmp_path))
    assert list(cached_rows(tmp_path).values()) == [6]
    records[2]["chosen"] = "The circle is green."
    pair_files(records)
    train(compose_train(overrides + [f"run_dir={tmp_path / 'run2'}"], tmp_path))
    assert list(cached_rows(tmp_path).values()) == [7]


@pytest.mark.parametrize("lora", [True, False])
def test_cached_run_matches_an_uncached_run_and_never_runs_the_reference(tmp_path: Path, lora: bool,
                                                                         monkeypatch) -> None:
    overrides = FAST + [f"model.lora.enabled={str(lora).lower()}", "data.val_fraction=0"]
    plain = train(compose_train(overrides + ["dpo.fast.reference_cache=false", f"run_dir={tmp_path / 'a'}"],
                                tmp_path / "a"))

    def no_reference(self):
        raise AssertionError("the reference model ran although its log-probs are cached")

    monkeypatch.setattr(DPOModule, "_reference_model", no_reference)
    cached = train(compose_train(overrides + [f"run_dir={tmp_path / 'b'}"], tmp_path / "b"))
    for key in ("loss", "rewards/margins", "logps/chosen"):
        assert torch.isclose(torch.tensor(plain.metrics[key]), torch.tensor(cached.metrics[key]), atol=1e-5), key


def test_full_finetuning_with_the_cache_builds_no_reference_copy(make_adapter) -> None:
    from miadpo.config import DPOConfig, OptimConfig

    adapter = make_adapter(lora={"enabled": False})
    assert DPOModule(adapter, DPOConfig(), OptimConfig(), cached_reference=True).reference is None
    assert DPOModule(adapter, DPOConfig(), OptimConfig()).reference is not None


def test_weights_identity_follows_content_not_names_and_sizes(tmp_path: Path) -> None:
    """A merged round-1 policy has the base's file names and sizes: its identity (hence every cache key) differs."""
    import os

    from miadpo.config import ModelConfig
    from miadpo.fingerprint import weights_identity

    weights = tmp_path / "policy"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    (weights / "model.safetensors").write_bytes(b"\x00" * 64)
    cfg = ModelConfig(path=str(weights))
    before = weights_identity(cfg)
    assert weights_identity(cfg) == before  # stable
    stat = (weights / "model.safetensors").stat()
    (weights / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")  # same size...
    os.utime(weights / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and modification time
    after = weights_identity(cfg)
    assert [f[:2] for f in after["files"]] == [f[:2] for f in before["files"]]
    assert after != before

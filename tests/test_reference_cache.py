"""Cached reference log-probs: keys, hits and misses, and training that never runs the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import compose_train
from safetensors.torch import load_file

from miadpo.dpo.module import DPOModule
from miadpo.dpo.reference import CachedReference, DisabledAdapterReference, FrozenCopyReference, build_reference
from miadpo.dpo.reference_cache import ReferenceCache
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


def count_reference_runs(monkeypatch) -> list[int]:
    """One entry per batch whose reference model ran in a training or validation step."""
    runs: list[int] = []
    for computed in (DisabledAdapterReference, FrozenCopyReference):
        def counting(self, *args, original=computed.logps, **kwargs):
            runs.append(1)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(computed, "logps", counting)
    return runs


def trained_weights(result) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(result.exported.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("lora", [True, False])
def test_in_step_filling_trains_as_the_prepass_and_as_no_cache_and_a_second_run_runs_no_reference(
        tmp_path: Path, lora: bool, monkeypatch) -> None:
    # 16 pairs, batch 4: 4 steps an epoch, 2 epochs.
    overrides = FAST + ["trainer.max_steps=8", f"model.lora.enabled={str(lora).lower()}", "data.val_fraction=0",
                        "optim.lr=5e-3"]
    runs = count_reference_runs(monkeypatch)
    results, reference_runs = {}, {}
    for name, extra in [("none", ["dpo.fast.reference_cache=false"]), ("prepass", ["dpo.fast.reference_prepass=true"]),
                        ("in_step", ["dpo.fast.reference_prepass=false"])]:
        runs.clear()
        results[name] = train(compose_train(overrides + extra + [f"run_dir={tmp_path / name}"], tmp_path / name))
        reference_runs[name] = len(runs)
    assert reference_runs == {"none": 8, "prepass": 0, "in_step": 4}  # in the step: the first epoch only
    assert list(cached_rows(tmp_path / "in_step").values()) == [16]  # each pair once
    weights = {name: trained_weights(result) for name, result in results.items()}
    for name in ("prepass", "in_step"):
        for key in ("loss", "rewards/margins", "logps/chosen"):
            assert results[name].metrics[key] == pytest.approx(results["none"].metrics[key], abs=1e-6), (name, key)
        for key, value in weights["none"].items():
            assert torch.allclose(weights[name][key], value, atol=1e-6), (name, key)
    # A second run on the same pairs builds no reference copy and runs no reference, in either mode.
    built = []
    init = DPOModule.__init__
    monkeypatch.setattr(DPOModule, "__init__", lambda self, *a, **k: init(self, *a, **k) or built.append(self))
    runs.clear()
    again = train(compose_train(overrides + ["dpo.fast.reference_prepass=false", f"run_dir={tmp_path / 'again'}"],
                                tmp_path / "in_step"))
    assert runs == [] and isinstance(built[-1].reference, CachedReference) and built[-1].reference.compute is None
    assert built[-1].reference.callbacks() == []  # nothing is filled in the step
    assert list(cached_rows(tmp_path / "in_step").values()) == [16]
    assert again.metrics["loss"] == pytest.approx(results["in_step"].metrics["loss"], abs=1e-6)


def test_full_finetuning_defaults_to_the_prepass_lora_to_the_step(tmp_path: Path) -> None:
    from miadpo.pipeline import uses_reference_prepass

    assert uses_reference_prepass(compose_train(["model.lora.enabled=false"], tmp_path))
    assert not uses_reference_prepass(compose_train([], tmp_path))
    assert uses_reference_prepass(compose_train([f"dpo.reference_path={tmp_path}"], tmp_path))
    assert not uses_reference_prepass(compose_train(["model.lora.enabled=false", "dpo.fast.reference_prepass=false"],
                                                    tmp_path))
    with pytest.raises(ValueError, match="dpo.reference_path needs .*pre-pass"):
        train(compose_train([f"dpo.reference_path={tmp_path}", "dpo.fast.reference_prepass=false"], tmp_path))


def test_full_finetuning_with_the_cache_builds_no_reference_copy(make_adapter, tmp_path: Path) -> None:
    from miadpo.config import DPOConfig, OptimConfig

    adapter = make_adapter(lora={"enabled": False})
    cache = ReferenceCache(tmp_path / "cache")
    cached = DPOModule(adapter, DPOConfig(), OptimConfig(), reference=build_reference(adapter.model, cache, True))
    assert isinstance(cached.reference, CachedReference) and cached.reference.compute is None
    assert not any(isinstance(m, FrozenCopyReference) for m in cached.modules())
    filling = build_reference(adapter.model, cache, covers_all=False)  # some pairs missing: computed and appended
    assert isinstance(filling, CachedReference) and isinstance(filling.compute, FrozenCopyReference)
    assert [type(c).__name__ for c in filling.callbacks()] == ["InStepFilling"]
    # the copy behind the cache is a submodule: it follows the LightningModule's device and precision
    module = DPOModule(adapter, DPOConfig(), OptimConfig(), reference=filling).to(torch.float64)
    copy = next(m for m in module.modules() if isinstance(m, FrozenCopyReference))
    assert all(p.dtype == torch.float64 for p in copy.parameters())
    # other weights (dpo.reference_path) are never replaced by the policy where the cache lacks a pair
    with pytest.raises(RuntimeError, match="dpo.reference_path"):
        build_reference(adapter.model, cache, covers_all=False, only_cached=True)
    assert isinstance(DPOModule(adapter, DPOConfig(), OptimConfig()).reference, FrozenCopyReference)


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


@pytest.mark.slow
def test_a_run_killed_mid_epoch_keeps_what_it_cached_and_the_resumed_run_computes_the_rest(
        tmp_path: Path, monkeypatch) -> None:
    from test_train import KillAt

    # 24 pairs, batch 4: 6 steps an epoch. Killed after step 5 (checkpoint of step 4 on disk), resumed, 9 steps.
    common = ["trainer.max_steps=9", "data.synthetic.num_pairs=24", "data.batch_size=4", "data.val_fraction=0",
              "checkpoint.every_n_train_steps=2", "optim.lr=5e-3", "dpo.fast.reference_prepass=false"]
    whole = train(compose_train(common, tmp_path / "whole"))
    runs = count_reference_runs(monkeypatch)
    with pytest.raises(RuntimeError, match="killed"):
        train(compose_train(common, tmp_path / "killed"), extra_callbacks=[KillAt(5)])
    assert len(runs) == 5 and list(cached_rows(tmp_path / "killed").values()) == [20]  # steps 1-5, kept
    runs.clear()
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    resumed = train(compose_train(common + [f"ckpt_path={last}", f"run_dir={tmp_path / 'resumed'}"],
                                  tmp_path / "killed"))
    # Step 5's pairs were cached before the kill: only step 6 (the rest of the first epoch) runs the reference.
    assert len(runs) == 1 and list(cached_rows(tmp_path / "killed").values()) == [24]
    a, b = trained_weights(whole), trained_weights(resumed)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key

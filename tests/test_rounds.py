"""On-policy rounds: two scaled-down toy rounds, resumption after a kill between rounds, the per-round table."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import compose_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from miadpo.rounds import run_rounds
from miadpo.toyworld.base import build_base
from miadpo.toyworld.pipeline import ensure_toy_world
from miadpo.train import train


@pytest.fixture(scope="module")
def toy_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toyworld")
    build_base(out, train_scenes=64, eval_scenes=12, multi_share=0.25, vision_epochs=1, sft_epochs=1,
               progress=False)
    ensure_toy_world(out, out / "base")
    return out


def rounds_overrides(out: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["model=toy_llava", f"model.path={out / 'base'}", "data=toy", f"data.source={out / 'pool.json'}",
            f"data.image_root={out / 'images'}", f"data.out_dir={run_dir.parent / 'data'}",
            "data.augment.max_records=32", "selection.generation.max_new_tokens=4",
            "selection.generation.min_new_tokens=1", "selection.min_perplexity=0",
            "selection.thresholds.sequence={2:1,3:1,4:1,5:1}", "selection.post.perplexity_max=null",
            "data.val_fraction=0", "trainer.max_steps=2",
            "data.report_samples=0", f"eval.files=[{out / 'test.json'},{out / 'test_sequences' / 'records.jsonl'}]",
            f"eval.toy_source={out / 'test.json'}", f"eval.image_root={out / 'images'}", "rounds.count=2",
            f"run_dir={run_dir}", *extra]


def policy_weights(record: dict) -> dict:
    return load_file(str(Path(record["policy"]) / "model.safetensors"))


@pytest.mark.slow
def test_two_rounds_select_with_the_current_policy(toy_world: Path, tmp_path: Path) -> None:
    cfg = compose_train(rounds_overrides(toy_world, tmp_path / "run", "model.lora.enabled=true"), tmp_path)
    records = run_rounds(cfg, train)
    assert [r["round"] for r in records] == [1, 2] and [r["seed"] for r in records] == [42, 43]
    # Round 2 starts from round 1's policy (its LoRA merged), selects with it and keeps its start as reference.
    assert records[1]["start"] == records[0]["policy"] == str(tmp_path / "run" / "round1" / "policy")
    assert records[1]["reference"] == records[1]["start"]
    manifests = [json.loads(next(Path(r["pairs"]).parents[1].glob("manifest.json")).read_text()) for r in records]
    assert manifests[0]["model"]["path"] == str(toy_world / "base")
    assert manifests[1]["model"]["path"] == records[0]["policy"]
    assert manifests[0]["model"]["weights"] != manifests[1]["model"]["weights"]  # by content: same names, sizes
    assert policy_weights(records[0]).keys() == policy_weights(records[1]).keys()
    # One table: the base, then after each round.
    table = json.loads((tmp_path / "run" / "eval_rounds.json").read_text())
    assert table["columns"] == ["group", "n", "base", "after round 1", "after round 2", "Δ total"]
    single = next(row for row in table["rows"] if row[0] == "single")
    assert single[3] == records[0]["evaluation"]["after"]["single"]["accuracy"]
    assert (tmp_path / "run" / "eval_rounds.md").read_text().startswith("| group | n | base |")


@pytest.mark.slow
def test_rounds_resume_after_a_kill_between_rounds(toy_world: Path, tmp_path: Path) -> None:
    calls: list[str] = []

    def killed_in_round_two(cfg):
        calls.append(cfg.run_dir)
        if cfg.run_dir.endswith("round2"):
            raise KeyboardInterrupt("killed")
        return train(cfg)

    overrides = rounds_overrides(toy_world, tmp_path / "run", "rounds.reference=base")
    with pytest.raises(KeyboardInterrupt):
        run_rounds(compose_train(overrides, tmp_path), killed_in_round_two)
    round_one = (tmp_path / "run" / "round1" / "round.json").stat().st_mtime_ns

    def counted(cfg):
        calls.append(cfg.run_dir)
        return train(cfg)

    resumed = run_rounds(compose_train(overrides, tmp_path), counted)
    assert [Path(c).name for c in calls] == ["round1", "round2", "round2"]  # round 1 was not trained again
    assert resumed[0]["policy"] == str(tmp_path / "run" / "round1" / "model")  # full fine-tuning: the export
    assert (tmp_path / "run" / "round1" / "round.json").stat().st_mtime_ns == round_one
    assert resumed[1]["reference"] == str(toy_world / "base")  # rounds.reference=base
    # The same as a run that was never interrupted.
    fresh = run_rounds(compose_train(rounds_overrides(toy_world, tmp_path / "fresh", "rounds.reference=base"),
                                     tmp_path), train)
    for a, b in zip(resumed, fresh):
        assert a["evaluation"] == b["evaluation"]
        weights_a, weights_b = policy_weights(a), policy_weights(b)
        assert all(weights_a[k].equal(weights_b[k]) for k in weights_a)


def test_a_finished_round_under_another_config_is_refused(toy_world: Path, tmp_path: Path) -> None:
    overrides = rounds_overrides(toy_world, tmp_path / "run")
    cfg = compose_train(overrides, tmp_path)
    (tmp_path / "run" / "round1").mkdir(parents=True)
    (tmp_path / "run" / "round1" / "round.json").write_text(json.dumps({"fingerprint": "other", "policy": "x"}))
    with pytest.raises(ValueError, match="different configuration"):
        run_rounds(cfg, train)


def test_rounds_need_a_source_recipe(tmp_path: Path) -> None:
    cfg = compose_train(["rounds.count=2"], tmp_path)  # synthetic pairs: nothing to select with the policy
    with pytest.raises(ValueError, match="needs a source recipe"):
        run_rounds(cfg, train)


def test_only_the_first_process_holds_a_rounds_lock(tmp_path: Path, monkeypatch) -> None:
    """Lightning's launcher re-runs the command in every process: the others train the round beside rank 0, they
    do not stop on its lock."""
    from miadpo import rounds

    cfg = OmegaConf.create({"run_dir": str(tmp_path / "round2"), "dpo": {"reference_path": None}, "seed": 1})
    taken: list[bool] = []

    def train(round_cfg):
        taken.append((tmp_path / "round2" / rounds.ROUND_LOCK).exists())
        return SimpleNamespace(exported=tmp_path / "model", pairs=tmp_path / "pairs.jsonl", global_step=1)

    (tmp_path / "model").mkdir()
    monkeypatch.setattr(rounds, "is_rank_zero", lambda: False)
    cache = rounds.round_cache(tmp_path / "round2", cfg)
    with cache.writing():  # rank 0 holds it
        record = rounds.run_round(cfg, cache, 2, str(tmp_path / "base"), train)
    assert taken == [True] and record["round"] == 2

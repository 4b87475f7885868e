"""On-policy rounds: ``python -m miadpo.train rounds.count=R [rounds.reference=round_start|base]``.

Round r (1-based) is one ordinary training job with
- the policy that round r − 1 ended with as its model (round 1: ``model.path``), so selection asks the current
  policy and DPO starts from it;
- a fresh augmentation seed, ``seed + r − 1`` (round 1 is exactly the one-round job), and its own data
  directory (``<data.out_dir>`` for round 1, ``<data.out_dir>/round<r>`` after);
- as reference the round's start policy (``round_start``) or the original base (``base``, through the
  reference cache).

Each round writes its outputs under ``<run_dir>/round<r>/`` and, once its policy is exported (LoRA merged into
``policy/``), ``round.json``. A rerun of the same command skips every round that has one, so a run killed
between or inside rounds resumes at the first unfinished round. ``eval_rounds.md`` / ``.json`` hold the
before/after evaluation of every round in one table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from miadpo.data.stage_cache import StageCache
from miadpo.fingerprint import round_key
from miadpo.lightning_setup import is_rank_zero
from miadpo.merge import merge_adapter
from miadpo.text import markdown_table

log = logging.getLogger(__name__)
ROUND_FILE = "round.json"
ROUND_LOCK = "round.lock"


def round_cache(run_dir: Path, cfg: DictConfig) -> StageCache:
    """A round's directory: its done marker ``round.json`` holds the round's record and fingerprint; a run
    training the round holds ``round.lock``."""
    return StageCache(run_dir, fingerprint(cfg), what=f"round {run_dir.name}", lock_name=ROUND_LOCK,
                      done_name=ROUND_FILE)


def round_config(cfg: DictConfig, round_index: int, policy: str | None, base: str | None) -> DictConfig:
    """The training job of round ``round_index`` (1-based) starting from ``policy``."""
    run_dir = Path(cfg.run_dir) / f"round{round_index}"
    out_dir = Path(cfg.data.out_dir) if round_index == 1 else Path(cfg.data.out_dir) / f"round{round_index}"
    changes: dict[str, Any] = {
        "run_dir": str(run_dir),
        "seed": int(cfg.seed) + round_index - 1,
        "model": {"path": policy},
        "data": {"out_dir": str(out_dir), "pairs": None},
        "rounds": {"count": 1},
        "ckpt_path": None,
    }
    if cfg.rounds.reference == "base" and round_index > 1:
        changes["dpo"] = {"reference_path": base}
    if cfg.logger.run_name:
        changes["logger"] = {"run_name": f"{cfg.logger.run_name}-round{round_index}"}
    return OmegaConf.merge(cfg, changes)  # type: ignore[return-value]


def fingerprint(cfg: DictConfig) -> str:
    """What a finished round's outputs depend on (its whole resolved config)."""
    return round_key(OmegaConf.to_container(cfg, resolve=True))


def finished_round(cache: StageCache) -> dict[str, Any] | None:
    """The record of a finished round (``round_cache``), or None; a round finished under another config is an
    error."""
    if not cache.is_done():
        return None
    path = cache.done
    record = json.loads(path.read_text())
    if record["fingerprint"] != cache.identity:
        raise ValueError(f"{path} was written by a different configuration; use another run_dir (hydra.run.dir=...) "
                         "or remove it to rerun that round")
    if not Path(record["policy"]).is_dir():
        raise FileNotFoundError(f"{path} names the policy {record['policy']}, which is missing")
    return record


def export_policy(exported: Path, base: str, run_dir: Path) -> Path:
    """The round's policy as a standard transformers directory (LoRA merged into its start weights)."""
    if not (exported / "adapter_config.json").is_file():
        return exported  # full fine-tuning: the exported model is the policy
    return merge_adapter(exported, run_dir / "policy", base=base)


def run_rounds(cfg: DictConfig, train: Callable[[DictConfig], Any]) -> list[dict[str, Any]]:
    """Run (or resume) ``cfg.rounds.count`` rounds with ``train`` (``miadpo.train.train``); one record per round."""
    if cfg.data.pairs is not None or not cfg.data.source:
        raise ValueError("rounds.count > 1 needs a source recipe (data.source, data.pairs=null): each round selects "
                         "its pairs with the current policy")
    records: list[dict[str, Any]] = []
    policy, base = cfg.model.path, cfg.model.path
    for index in range(1, int(cfg.rounds.count) + 1):
        round_cfg = round_config(cfg, index, policy, base)
        run_dir = Path(round_cfg.run_dir)
        cache = round_cache(run_dir, round_cfg)
        record = finished_round(cache)
        if record is None:
            log.info("round %d of %d: policy %s", index, cfg.rounds.count, policy or "built in code")
            record = run_round(round_cfg, cache, index, policy, train)
        else:
            log.info("round %d of %d: finished before (%s), skipped", index, cfg.rounds.count, run_dir / ROUND_FILE)
        records.append(record)
        policy = record["policy"]
        base = base or record["start"]
    write_rounds_table(Path(cfg.run_dir), records)
    return records


def run_round(round_cfg: DictConfig, cache: StageCache, index: int, policy: str | None,
              train: Callable[[DictConfig], Any]) -> dict[str, Any]:
    """Train round ``index`` from ``policy``, export its policy and write its ``round.json``. The first process holds
    the round's lock (a second run of the same command fails at once instead of training the round again); the
    other processes of a multi-process run (Lightning's launcher re-runs the command in each) train beside it."""
    run_dir = cache.directory
    with cache.writing() if is_rank_zero() else nullcontext():
        result = train(round_cfg)
        start = policy or str(run_dir / "base_model")  # a model built in code is saved with its run
        evaluation = run_dir / "eval_before_after.json"
        record = {"round": index, "seed": int(round_cfg.seed), "start": start,
                  "reference": round_cfg.dpo.reference_path or start,
                  "policy": str(export_policy(Path(result.exported), start, run_dir)),
                  "pairs": str(result.pairs), "global_step": result.global_step,
                  "evaluation": json.loads(evaluation.read_text()) if evaluation.is_file() else None,
                  "fingerprint": cache.identity}
        cache.finish(json.dumps(record, indent=1) + "\n")
    return record


def rounds_table(records: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows: accuracy per group before round 1 and after every round, and the total change."""
    tables = [r["evaluation"] for r in records]
    if not tables or tables[0] is None:
        return [], []
    columns = ["group", "n", "base", *[f"after round {r['round']}" for r in records], "Δ total"]
    rows = []
    for group, row in tables[0]["before"].items():
        after = [t["after"][group]["accuracy"] for t in tables]
        rows.append([group, int(row["n"]), row["accuracy"], *after, after[-1] - row["accuracy"]])
    return columns, rows


def write_rounds_table(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """``eval_rounds.json`` (columns, rows and the round records) and ``eval_rounds.md`` in ``run_dir``."""
    columns, rows = rounds_table(records)
    (run_dir / "eval_rounds.json").write_text(json.dumps({"columns": columns, "rows": rows,
                                                          "rounds": records}, indent=1) + "\n")
    cells = [[row[0], row[1], *[f"{v:.1f}" for v in row[2:-1]], f"{row[-1]:+.1f}"] for row in rows]
    (run_dir / "eval_rounds.md").write_text(markdown_table(columns, cells) + "\n" if rows else "")

"""Evaluation entry point: accuracy of a model on LLaVA-format test files and VLMEvalKit-style MCQ TSVs.

    python -m miadpo.evaluate model=toy_llava model.path=... eval.files=[test.json,records.jsonl] \\
        eval.toy_source=test.json eval.tsv=[BLINK.tsv]

Items: ``miadpo.eval.items``; greedy answers and scoring: ``miadpo.eval.scoring``; with a toy source, each wrong
answer is classed by ``miadpo.toyworld.errors`` (distractor / in no image / other). A record or row whose image
cannot be used is skipped, counted and logged, or stops the run, by ``eval.on_bad_record`` /
``eval.max_bad_fraction``. Writes ``eval.json`` (table, predictions, ``skipped``: file:line (id): reason of each
record left out) and ``eval.md`` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from miadpo.config import config_dir, register_configs
from miadpo.eval.items import eval_items
from miadpo.eval.scoring import evaluate, table_markdown
from miadpo.models import ModelAdapter, build_adapter
from miadpo.toyworld.errors import ToyErrors

register_configs()
CONFIG_DIR = config_dir()


def run_evaluation(cfg: DictConfig, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Score the model of ``cfg.model`` (or ``adapter``) on ``cfg.eval``; writes ``eval.json`` and ``eval.md`` into
    ``cfg.run_dir`` and returns what eval.json holds (table, predictions, skipped)."""
    items, report = eval_items(cfg.eval)  # before the model loads: a bad record under "error" stops at once
    adapter = adapter or build_adapter(cfg.model)
    classify = ToyErrors.of_source(cfg.eval.toy_source) if cfg.eval.toy_source else None
    table, predictions = evaluate(adapter, items, cfg.eval.batch_size, cfg.eval.max_new_tokens, classify)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"table": table, "predictions": dict(zip([i.id for i in items], predictions)),
               "skipped": [str(bad) for bad in report.bad]}
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    (run_dir / "eval.md").write_text(table_markdown(table))
    if cfg.eval.wandb:
        import wandb

        run = wandb.init(project=cfg.eval.wandb_project, dir=str(run_dir), mode=cfg.eval.wandb_mode,
                         job_type="evaluate")
        run.log({f"eval/{group}/{k}": v for group, row in table.items() for k, v in row.items()})
        columns = list(dict.fromkeys(k for row in table.values() for k in row))
        run.log({"eval/table": wandb.Table(columns=["group", *columns],
                                           data=[[g, *(r.get(c) for c in columns)] for g, r in table.items()])})
        run.finish()
    print(table_markdown(table))
    if report.bad:
        print(f"skipped {len(report.bad)} of {report.total} records with an unusable image (listed in eval.json)")
    print(f"results: {run_dir.resolve() / 'eval.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    main()

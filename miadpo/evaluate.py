"""Evaluation entry point: accuracy of a model on LLaVA-format test files, VLMEvalKit-style MCQ TSVs and the
paper's benchmarks read from local files (``eval=paper``, ``miadpo.eval.benchmarks``).

    python -m miadpo.evaluate model=toy_llava model.path=... eval.files=[test.json,records.jsonl] \\
        eval.toy_source=test.json eval.tsv=[BLINK.tsv]
    python -m miadpo.evaluate model=llava15 model.path=<policy> eval=paper eval.benchmarks.mmmu=<dir> ... \\
        compare=<the base's eval.json>

Items: ``miadpo.eval.sets``; greedy answers and scoring: ``miadpo.eval.scoring``; with a toy source, each wrong
answer is classed by ``miadpo.toyworld.errors`` (distractor / in no image / other). A record or row whose image
cannot be used is skipped, counted and logged, or stops the run, by ``eval.on_bad_record`` /
``eval.max_bad_fraction``; one whose prompt does not fit the model is skipped and counted. Writes ``eval.json``
(table, ``predictions``: per group (benchmark, TSV, record group) each item's answer, ``correct``: per group each
item's correctness, ``skipped``: file:line (id): reason of each
item left out, ``notes``: the same for items kept after an adjustment their benchmark's rules make,
``not_evaluated``: the parts left out whole (an MVBench task without any of its videos) and how to supply them; with
``compare``, ``comparison``: per group Δ, paired bootstrap 95% interval, McNemar p) and ``eval.md`` into the run
directory; with ``eval.wandb``, the table and a table of sample items on W&B.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from PIL import Image, ImageOps

from miadpo.config import EvalJobConfig, check_keys, config_dir, read_only, register_configs
from miadpo.data.images import ImageOptions
from miadpo.eval.compare import compare_correctness, comparison_markdown
from miadpo.eval.scoring import Evaluation, evaluate, prompt_limit, published_counts, table_markdown
from miadpo.eval.sets import eval_items
from miadpo.lightning_setup import wandb_files_in
from miadpo.models import ModelAdapter
from miadpo.pipeline import prepare_eval_set, prepare_model
from miadpo.toyworld.errors import ToyErrors

register_configs()
CONFIG_DIR = config_dir()
THUMBNAIL = 160  # pixels, the side of each image in the W&B samples


def load_correct(path: Path) -> dict[str, dict[str, bool]]:
    """The per-item correctness of another run's eval.json; ValueError naming the file if it has none."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"compare={path}: not a readable eval.json ({exc})") from exc
    if not isinstance(saved, dict) or "correct" not in saved:
        raise ValueError(f"compare={path}: no per-item 'correct' results (an eval.json of an older miadpo?)")
    correct = saved["correct"]
    if not isinstance(correct, dict):
        raise ValueError(f"compare={path}: 'correct' is a {type(correct).__name__}, not a map of group → item → "
                         "true/false")
    for group, units in correct.items():
        if not isinstance(units, dict) or not all(isinstance(v, bool) for v in units.values()):
            raise ValueError(f"compare={path}: correct[{group!r}] is not a map of item id → true/false")
    return correct


def contact_sheet(images: list[Image.Image]) -> Image.Image:
    """An item's images side by side, each fitted in a THUMBNAIL square."""
    thumbs = [ImageOps.contain(image, (THUMBNAIL, THUMBNAIL)) for image in images]
    sheet = Image.new("RGB", (THUMBNAIL * max(len(thumbs), 1), THUMBNAIL), "white")
    for k, thumb in enumerate(thumbs):
        sheet.paste(thumb, (k * THUMBNAIL, 0))
    return sheet


def sample_indices(groups: list[str], count: int) -> list[int]:
    """Up to ``count`` item indices taken from each group in turn (first items first), so every benchmark shows."""
    by_group: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    rounds = zip_longest(*by_group.values())
    return [index for row in rounds for index in row if index is not None][:count]


def log_wandb(cfg: DictConfig, run_dir: Path, evaluation: Evaluation) -> None:
    """The table and ``eval.samples`` sample items on W&B; the run and the staged files of its tables (images
    included) stay under ``<run_dir>/wandb`` (``lightning_setup.wandb_files_in``)."""
    import wandb

    table = evaluation.table
    with wandb_files_in(run_dir):
        run = wandb.init(project=cfg.eval.wandb_project, dir=str(run_dir), mode=cfg.eval.wandb_mode,
                         job_type="evaluate")
        run.log({f"eval/{group}/{k}": v for group, row in table.items() for k, v in row.items()})
        columns = list(dict.fromkeys(k for row in table.values() for k in row))
        run.log({"eval/table": wandb.Table(columns=["group", *columns],
                                           data=[[g, *(r.get(c) for c in columns)] for g, r in table.items()])})
        samples = wandb.Table(columns=["id", "group", "images", "question", "prediction", "answer"])
        options = ImageOptions.of(cfg.eval)
        for index in sample_indices([item.group for item in evaluation.items], cfg.eval.samples):
            item, prediction = evaluation.items[index], evaluation.predictions[index]
            samples.add_data(item.id, item.group, wandb.Image(contact_sheet(item.load_images(options))),
                             item.prompt, prediction, item.answer)
        run.log({"eval/samples": samples})
        run.finish()
        # Reset wandb's process-wide state: a later offline run in this process (a training job's WandbLogger)
        # would otherwise ask for an API key.
        wandb.teardown()


def run_evaluation(cfg: DictConfig, adapter: ModelAdapter | None = None) -> dict[str, Any]:
    """Score the model of ``cfg.model`` (or ``adapter``) on ``cfg.eval``; writes ``eval.json`` and ``eval.md`` into
    ``cfg.run_dir`` and returns what eval.json holds."""
    check_keys(cfg, EvalJobConfig)
    cfg = read_only(cfg)
    other = load_correct(Path(cfg.compare)) if cfg.compare else None  # a bad compare file stops before the model
    prepare_eval_set(cfg.eval)  # eval=toy: the toy splits on first use, in any working directory
    items, report = eval_items(cfg.eval)  # before the model loads: a bad record under "error" stops at once
    adapter = adapter or prepare_model(cfg.model)  # model=toy_llava: the shipped toy base on first use
    classify = ToyErrors.of_source(cfg.eval.toy_source) if cfg.eval.toy_source else None
    evaluation = evaluate(adapter, items, cfg.eval.batch_size, cfg.eval.max_new_tokens, classify,
                          ImageOptions.of(cfg.eval), report,
                          prompt_limit(adapter, cfg.eval.max_length, cfg.eval.max_new_tokens), cfg.eval.progress)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    correct = evaluation.correct()
    # Left out when read (report.bad), then when answered (evaluation.skipped: undecodable, too long).
    skipped = [str(bad) for bad in report.bad if str(bad) not in evaluation.skipped] + evaluation.skipped
    results: dict[str, Any] = {
        "table": evaluation.table, "predictions": evaluation.keyed_predictions(),
        "correct": correct, "skipped": skipped, "notes": [str(note) for note in report.notes],
        "not_evaluated": report.not_evaluated}
    markdown = table_markdown(evaluation.table)
    if report.not_evaluated:
        markdown += "\nNot evaluated:\n\n" + "".join(f"- {part}\n" for part in report.not_evaluated)
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))  # kept whatever the comparison does
    if other is not None:
        comparison = compare_correctness(other, correct, seed=int(cfg.seed),
                                         published=published_counts(evaluation.items))
        results["comparison"] = {"other": str(cfg.compare), **{g: d.as_dict() for g, d in comparison.items()}}
        markdown += f"\nThis run against {cfg.compare} (Δ = this − that):\n\n"
        markdown += comparison_markdown(comparison, "that", "this")
    (run_dir / "eval.json").write_text(json.dumps(results, indent=1))
    (run_dir / "eval.md").write_text(markdown)
    if cfg.eval.wandb:
        log_wandb(cfg, run_dir, evaluation)
    print(markdown)
    if results["skipped"]:
        print(f"skipped {len(results['skipped'])} of {report.total} items (listed in eval.json)")
    report.finish()
    print(f"results: {run_dir.resolve() / 'eval.json'}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Entry point of ``python -m miadpo.evaluate``: ``run_evaluation`` of the composed config."""
    run_evaluation(cfg)


if __name__ == "__main__":
    main()

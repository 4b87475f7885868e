"""The evaluation set of an ``EvalConfig``: LLaVA-format files, VLMEvalKit TSVs and the paper's benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport, ImageRoots
from miadpo.eval.benchmarks import BENCHMARKS, benchmark_items
from miadpo.eval.items import EvalItem, llava_items, tsv_items


def has_eval_set(cfg: Any) -> bool:
    """Whether ``cfg`` (an ``EvalConfig``) names anything to evaluate on."""
    return bool(cfg.files or cfg.tsv or any(getattr(cfg.benchmarks, name) for name in BENCHMARKS))


def check_eval_set(cfg: Any) -> None:
    """FileNotFoundError naming each benchmark directory of ``cfg`` that does not exist (checked before a training
    job runs any stage; the readers check the files inside). ``eval.files`` may be written by the data recipe's
    preparation (the toy world's test split), so they are checked when read."""
    missing = [f"eval.benchmarks.{name}: {getattr(cfg.benchmarks, name)}" for name in BENCHMARKS
                if getattr(cfg.benchmarks, name) and not Path(getattr(cfg.benchmarks, name)).is_dir()]
    if missing:
        raise FileNotFoundError("evaluation set not found: " + "; ".join(missing))


def eval_items(cfg: Any) -> tuple[list[EvalItem], BadRecordReport]:
    """The items of ``eval.files``, ``eval.tsv`` and ``eval.benchmarks`` and the report of the records left out
    (``report.bad``: file:line (id): reason) by ``eval.on_bad_record`` / ``eval.max_bad_fraction``. Images are
    checked, not decoded (``miadpo.eval.sources``); the report goes on to ``evaluate``, which decodes them."""
    roots, image_options = ImageRoots.of(cfg), ImageOptions.of(cfg)
    report = BadRecordReport(cfg.on_bad_record, cfg.max_bad_fraction, stage="eval", settings="eval")
    items = [item for f in cfg.files for item in llava_items(Path(f), roots, report, image_options)]
    items += [item for f in cfg.tsv for item in tsv_items(Path(f), report, image_options)]
    items += benchmark_items(cfg, report, image_options)
    report.finish()
    return items, report

"""Readers of the paper's multi-image benchmarks from the files their authors publish (one module each, its schema
and prompt convention in its docstring), all giving ``miadpo.eval.items.EvalItem``.

``eval.benchmarks.<name>`` is the local directory of each (null: not evaluated); ``benchmark_items`` reads those
set. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks import blink, mantis, mmmu, mvbench, nlvr2
from miadpo.eval.benchmarks.blink import read_blink
from miadpo.eval.benchmarks.mantis import read_mantis
from miadpo.eval.benchmarks.mmmu import read_mmmu
from miadpo.eval.benchmarks.muirbench import read_muirbench
from miadpo.eval.benchmarks.mvbench import read_mvbench
from miadpo.eval.benchmarks.nlvr2 import read_nlvr2
from miadpo.eval.items import EvalItem

BENCHMARKS = ("mmmu", "blink", "mantis_eval", "nlvr2", "mvbench", "muirbench")  # eval.benchmarks keys
# Items as published (the counts in the readers' docstrings); NLVR2's is the row count of the split file read.
PUBLISHED_ITEMS = {"mmmu": 900, "blink": 1901, "mantis_eval": 217, "mvbench": 4000, "muirbench": 2600}
# The groups of the paper's "multi-image average" (Table 1: MMMU, BLINK, Mantis-Eval, NLVR2, MVBench; not MuirBench).
PAPER_AVERAGE = (mmmu.NAME, blink.NAME, mantis.NAME, nlvr2.NAME, mvbench.NAME)


def benchmark_items(cfg: Any, report: BadRecordReport, options: ImageOptions) -> list[EvalItem]:
    """The items of every benchmark ``cfg.benchmarks`` (an ``EvalConfig``'s) names a directory for."""
    dirs, version = cfg.benchmarks, cfg.datasets_cache_version
    readers = {
        "mmmu": lambda root: read_mmmu(root, report, options, version),
        "blink": lambda root: read_blink(root, report, options, version),
        "mantis_eval": lambda root: read_mantis(root, report, options, version),
        "nlvr2": lambda root: read_nlvr2(root, report, options, cfg.nlvr2_split),
        "mvbench": lambda root: read_mvbench(root, report, options, cfg.frames, cfg.frame_fps),
        "muirbench": lambda root: read_muirbench(root, report, options, version),
    }
    items: list[EvalItem] = []
    for name in BENCHMARKS:
        if not getattr(dirs, name):
            continue
        rows_before = report.total
        read = readers[name](Path(getattr(dirs, name)))
        published = PUBLISHED_ITEMS.get(name, report.total - rows_before)  # NLVR2: the rows of its split file
        for item in read:
            item.published = published
        items += read
    return items

"""Sweep summary: after a Hydra multirun, one table of every job's overrides and final metrics.

Registered as a Hydra callback by the sweep configs (``conf/sweep/``, shipped with the package); writes
``summary.md`` and ``summary.csv`` in the sweep directory (``multirun/train/<time>/``), after every job (a failed
job marked with its error) and at the end.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from miadpo.text import markdown_table

log = logging.getLogger(__name__)

ERROR_FILE = "error.txt"  # a failed job's error, in its output directory
DEFAULT_COLUMNS = ("loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins",
                   "eval/multi-image mean/after", "eval/single/after", "global_step")


def summarise(sweep_dir: Path, columns: tuple[str, ...] = DEFAULT_COLUMNS) -> tuple[Path, list[dict[str, Any]]]:
    """Collect ``<job>/.hydra/overrides.yaml`` and ``<job>/metrics.json`` of every job under ``sweep_dir``."""
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir()), key=lambda p: (len(p.name), p.name)):
        overrides_file, metrics_file = job / ".hydra" / "overrides.yaml", job / "metrics.json"
        if not overrides_file.is_file():
            continue
        overrides = yaml.safe_load(overrides_file.read_text()) or []
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        error = job / ERROR_FILE
        status = ("done" if metrics else f"failed: {error.read_text().strip()}" if error.is_file()
                  else "failed or unfinished")
        row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides), "status": status}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o))
        row.update({c: metrics[c] for c in columns if c in metrics})
        rows.append(row)
    keys = {o.split("=", 1)[0] for r in rows for o in r["overrides"].split() if "=" in o}
    varying = sorted(k for k in keys if len({r.get(k) for r in rows}) > 1)  # the swept keys, one column each
    present = [c for c in columns if any(c in r for r in rows)]
    header = ["job", *varying, *present, "status"]
    cells = [[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in header]
             for row in rows]
    path = sweep_dir / "summary.md"
    path.write_text(f"# Sweep summary: {sweep_dir}\n\n" + markdown_table(header, cells) + "\n")
    with (sweep_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*header, "overrides"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path, rows


class SweepSummary(Callback):
    """Hydra callback: write the sweep's summary table after every job (a failed job's error, first line, kept in
    its ``error.txt``) and when the multirun ends. Hydra stops a multirun at a failed job's batch without calling
    ``on_multirun_end``, so the summary written after each job is what a sweep with a failed job leaves."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Writes a failed job's ``error.txt``, then the sweep's summary so far."""
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            (Path(config.hydra.runtime.output_dir) / ERROR_FILE).write_text(f"{type(error).__name__}: {first}\n")
        summarise(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Writes the sweep's summary, prints it and logs where it is."""
        path, rows = summarise(Path(config.hydra.sweep.dir))
        print(path.read_text())
        log.info("sweep summary of %d jobs: %s", len(rows), path)

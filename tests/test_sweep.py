"""Hydra multirun sweeps: every job runs, caches are built once, the summary table is written."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from reliability import case


@pytest.mark.slow
def test_two_by_two_sweep_writes_a_summary_and_reuses_the_caches(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    # By name, from a directory outside the checkout: the sweep configs ship with the package's configs.
    args = [sys.executable, "-m", "miadpo.train", "-m", "--config-name", "sweep/beta",
            "model=tiny_llava", "data=synthetic", "dpo.beta=0.1,0.3", "dpo=sigmoid,ipo", "trainer.max_steps=2",
            "data.synthetic.num_pairs=8", "data.batch_size=2", "data.val_fraction=0.25", "logger=csv",
            f"data.out_dir={tmp_path / 'data'}", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert {(r["dpo.beta"], r["dpo"]) for r in rows} == {("0.1", "sigmoid"), ("0.1", "ipo"), ("0.3", "sigmoid"),
                                                         ("0.3", "ipo")}
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # a number in every row
    assert "| job | dpo | dpo.beta |" in (sweep / "summary.md").read_text()
    # The pairs were drawn once and each reference log-prob computed once, for all four jobs: in the first job's
    # steps (LoRA fills the cache in the step), 2 steps × 2 pairs; the other jobs, same seed, read them.
    assert len(list((tmp_path / "data").rglob("pairs.jsonl"))) == 1
    logps = list((tmp_path / "data" / "reference_logps").rglob("logps.*.jsonl"))
    keys = [line.split('"key": "')[1][:24] for line in logps[0].read_text().splitlines()]
    assert len(logps) == 1 and len(keys) == len(set(keys)) == 4


@pytest.mark.parametrize("failed_last", [
    case("configuration", "sweep-with-a-failed-job", "a sweep with one invalid job (the valid job ran, but no "
         "summary.md / .csv was written: Hydra stops before its end-of-sweep callback)", "the summary is written after "
         "every job; the failed job's row says 'failed: <error>' (its error.txt)", True),
    False,
])
def test_a_sweep_with_a_failed_job_still_writes_its_summary(tmp_path: Path, failed_last: bool) -> None:
    from hydra.core.utils import JobReturn, JobStatus
    from omegaconf import OmegaConf

    from miadpo.sweep import SweepSummary

    sweep, callback = tmp_path / "sweep", SweepSummary()
    jobs = [("0", ["dpo.beta=0.1"], None), ("1", ["dpo.beta=0"], ValueError("dpo.beta must be > 0, not 0.0"))]
    for name, overrides, error in jobs if failed_last else jobs[::-1]:
        (sweep / name / ".hydra").mkdir(parents=True)
        (sweep / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if error is None:
            (sweep / name / "metrics.json").write_text(json.dumps({"loss": 0.5, "global_step": 2}))
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)},
                                             "runtime": {"output_dir": str(sweep / name)}}})
        result = JobReturn(status=JobStatus.FAILED if error else JobStatus.COMPLETED, _return_value=error)
        callback.on_job_end(config, result)
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | 0.1 | 0.5 | 2 | done |" in summary
    assert "| 1 | 0 |  |  | failed: ValueError: dpo.beta must be > 0, not 0.0 |" in summary
    assert (sweep / "summary.csv").is_file()

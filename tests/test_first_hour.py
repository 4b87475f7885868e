"""The first hour of a new user (issue 32): experiments/first_hour.sh runs green in a fresh directory outside the
checkout with the installed commands, every step timed, in at most five minutes."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_first_hour_runs_in_five_minutes(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(REPO / "experiments" / "first_hour.sh"), str(tmp_path / "work")],
                          cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = dict(re.findall(r"^(.+?)\s+([\d.]+) s$", proc.stdout, flags=re.M))
    assert {"train (own pair file)", "resume (ckpt_path alone)", "merge", "evaluate", "train (pairs + TRL parquet)",
            "train (flat folder, grid)", "sweep 2x2 (by name)", "total"} <= set(steps), proc.stdout
    print(proc.stdout)
    assert float(steps["total"]) <= 300, proc.stdout

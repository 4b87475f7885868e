"""``experiments/gpu_check.sh --dry-run``: the GPU check's steps run on CPU at tiny shapes (what CI can check)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" in proc.stdout  # the GPU-marked tests are collected, and skip without CUDA
    text = out.read_text()
    assert text.startswith("# GPU check (dry run")
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for method in ("fast", "plain", "trl"):
        assert "%" in rows[method], rows[method]  # pairs/s, FLOPs and MFU measured
    assert rows["fsdp"].split("|")[2].strip() == "0"  # the FSDP smoke run trained
    assert "deepspeed_zero2" in rows  # on CPU it stops with the message saying DeepSpeed needs a GPU
    assert {"1", "2", "4"} <= rows.keys()  # selection throughput at three batch sizes


def test_gpu_check_names_a_wrong_argument() -> None:
    proc = subprocess.run(["bash", str(REPO / "experiments" / "gpu_check.sh"), "--dryrun"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown argument '--dryrun'" in proc.stderr

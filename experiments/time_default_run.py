"""Time the embedded default job (`python -m miadpo.train`, no arguments) end to end on this machine.

    python experiments/time_default_run.py [--repeats 2]

Prints a table and writes it, with the before/after table the first run printed, to
experiments/results/default_run.md. Each run is a fresh process in the same temporary working directory: the
first generates the toy world (shipped base copied, splits, augmentation, selection, reference log-probs) and the
second reuses it; both train, export and evaluate before/after (on the toy test split).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results" / "default_run.md"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    rows = []
    printed = ""
    with tempfile.TemporaryDirectory() as workdir:
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
        for repeat in range(args.repeats):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "miadpo.train"], cwd=workdir, env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"default run failed:\n{proc.stderr[-4000:]}")
            data = "generated (first run)" if repeat == 0 else "reused"
            if repeat == 0 and "evaluation before/after" in proc.stdout:
                printed = proc.stdout[proc.stdout.index("evaluation before/after"):]
            rows.append((repeat + 1, data, f"{seconds:.1f}"))
    header = (f"Default job `python -m miadpo.train` on {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'}), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads\n\n")
    table = "| run | toy world data, pairs, reference log-probs | wall time (s) |\n|---|---|---|\n"
    table += "".join(f"| {r} | {d} | {s} |\n" for r, d, s in rows)
    if printed:
        table += "\nWhat the first run printed (test split):\n\n```\n" + printed.rstrip() + "\n```\n"
    print(header + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + table)


if __name__ == "__main__":
    main()

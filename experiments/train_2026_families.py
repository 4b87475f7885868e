"""The 2026 model families through the command line, as a user with weights would run them (issues 33 and 34).

    python experiments/train_2026_families.py [--families gemma4 minicpm_v4_6 ...]

For each family's weights config (``conf/model/<name>.yaml``): its tiny in-code model is saved as a weights
directory laid out as the release's (config, weights, tokenizer, image processor, chat template), then

1. ``python -m miadpo.train model=<name> model.path=<dir> data=pairs ...`` trains 2 steps (batch 2, LoRA r8, lr 1e-3
   without warm-up, fp32) on
   a pair file of 1-, 3- and 5-image pairs whose images have odd sizes; the run's exit status, wall time, the
   adapter it saved and its last logged DPO loss are recorded;
2. the same command without weights must stop before any model loads with the download hint: with ``model.path``
   left at the config's checkpoint name (no such local directory: the hint names the checkpoint) and with
   ``model.path`` at an empty directory (the hint says what it lacks).

Writes experiments/results/models_2026.md. One process at a time, 1 torch thread each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from miadpo.models import build_adapter
from miadpo.train import CONFIG_DIR

# weights config → its tiny in-code twin
FAMILIES = {
    "qwen3_vl": "tiny_qwen3_vl", "qwen3_vl_moe": "tiny_qwen3_vl_moe", "qwen3_5": "tiny_qwen3_5",
    "qwen3_5_moe": "tiny_qwen3_5_moe", "internvl3_5": "tiny_internvl3_5", "gemma3": "tiny_gemma3",
    "gemma4": "tiny_gemma4", "glm4_1v": "tiny_glm4v", "glm4_5v": "tiny_glm4v_moe", "glm4_6v_flash": "tiny_glm46v",
    "minicpm_v4_6": "tiny_minicpm_v4_6",
}
IMAGE_COUNTS = [1, 3, 5, 1, 3, 5]
SIZES = [(64, 32), (40, 90), (48, 48), (90, 50), (30, 70)]
RESULTS = Path(__file__).parent / "results" / "models_2026.md"


def model_config(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"model={name}"]).model


def write_pairs(root: Path) -> Path:
    """Six pairs of 1, 3 and 5 random-pixel images of odd sizes, as a pair file under ``root``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for index, count in enumerate(IMAGE_COUNTS):
        names = []
        for k in range(count):
            width, height = SIZES[(index + k) % len(SIZES)]
            name = f"p{index}_{k}.png"
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / "images" / name)
            names.append(name)
        header = "".join(f"Image{k + 1}: <image>\n" for k in range(count))
        records.append({"id": f"pair-{index}", "images": names, "prompt": header + "What colour is the circle?",
                        "chosen": "The circle is red.", "rejected": "The circle is blue.",
                        "meta": {"format": "sequence", "n_images": count, "target": 1}})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def train_command(name: str, weights: Path, pairs: Path, work: Path) -> list[str]:
    return [sys.executable, "-m", "miadpo.train", f"model={name}", f"model.path={weights}", "model.dtype=float32",
            "model.gradient_checkpointing=false", "model.lora.r=8", "model.lora.alpha=16", "data=pairs",
            f"data.pairs={pairs}", f"data.image_root={pairs.parent / 'images'}", f"data.out_dir={work / 'data'}",
            "data.batch_size=2", "trainer.max_steps=2", "optim.lr=1e-3", "optim.warmup_ratio=0",
            f"run_dir={work / 'run'}", "logger=csv", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false"]


def logged_losses(run_dir: Path) -> list[float]:
    """The training ``loss`` values (the DPO objective of a step) the CSV logger wrote under the run."""
    values = []
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open() as handle:
            values += [float(row["loss"]) for row in csv.DictReader(handle) if row.get("loss")]
    return values


def stops_with_hint(command: list[str], env: dict[str, str], *needles: str) -> bool:
    """The command fails with the download hint and every one of ``needles`` in its output."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    output = done.stderr + done.stdout
    return done.returncode != 0 and "huggingface-cli download" in output and all(n in output for n in needles)


def run_family(name: str, root: Path, pairs: Path) -> dict[str, object]:
    work = root / name
    weights = work / "weights"
    build_adapter(model_config(FAMILIES[name])).save_base(weights)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    trained = subprocess.run(train_command(name, weights, pairs, work), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    empty = work / "empty_download"
    empty.mkdir()
    checkpoint = str(model_config(name).path)
    without = [part for part in train_command(name, weights, pairs, root / f"{name}_missing")
               if not part.startswith("model.path=")]
    return {
        "name": name, "tiny": FAMILIES[name], "rc": trained.returncode, "seconds": seconds,
        "adapter": (work / "run" / "adapter" / "adapter_model.safetensors").is_file(),
        "losses": logged_losses(work / "run"),
        "hint": stops_with_hint(without, env, checkpoint),
        "hint_empty": stops_with_hint(train_command(name, empty, pairs, root / f"{name}_empty"), env,
                                      "has no config.json and no weight files"),
        "checkpoint": checkpoint,
        "tail": (trained.stderr or trained.stdout)[-2000:] if trained.returncode else "",
    }


def report(rows: list[dict[str, object]]) -> str:
    lines = ["# The 2026 families from the command line",
             "",
             "`python experiments/train_2026_families.py`: each weights config trained 2 steps by "
             "`python -m miadpo.train model=<name> model.path=<dir> data=pairs` on its tiny model saved as a weights "
             f"directory; pairs of {', '.join(map(str, IMAGE_COUNTS))} images of odd sizes, batch 2, LoRA r8, lr 1e-3 "
             "without warm-up (so the second step's loss moves off ln 2), fp32, 1 thread. Hints: the same command "
             "without weights stops before loading with the download hint, naming the checkpoint (no `model.path` "
             "given) or what an empty directory lacks.",
             "",
             "| `model=` | tiny twin | checkpoint named | exit | seconds (whole command) | adapter saved "
             "| logged DPO loss per step | hint, no weights | hint, empty directory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        losses = ", ".join(f"{value:.4f}" for value in row["losses"]) or "—"
        lines.append(f"| `{row['name']}` | `{row['tiny']}` | `{row['checkpoint']}` | {row['rc']} | "
                     f"{row['seconds']:.1f} | {'yes' if row['adapter'] else 'no'} | {losses} | "
                     f"{'yes' if row['hint'] else 'no'} | {'yes' if row['hint_empty'] else 'no'} |")
    failed = [row for row in rows if row["rc"]]
    for row in failed:
        lines += ["", f"## `{row['name']}` failed", "", "```", str(row["tail"]), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pairs = write_pairs(root / "pairs")
        rows = []
        for name in args.families:
            rows.append(run_family(name, root, pairs))
            print(f"{name}: exit {rows[-1]['rc']}, {rows[-1]['seconds']:.1f} s, losses {rows[-1]['losses']}",
                  flush=True)
    RESULTS.write_text(report(rows))
    print(f"wrote {RESULTS}")
    if any(row["rc"] or not (row["hint"] and row["hint_empty"] and row["adapter"]) for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()

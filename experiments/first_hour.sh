#!/usr/bin/env bash
# The first hour of a new user, in minutes: the installed package's commands, tiny models, a fresh directory outside
# the checkout, each step timed. CI runs it (tests/test_first_hour.py); the README's "Your own model and data"
# shows the same commands.
#
#   bash experiments/first_hour.sh [WORKDIR]      # default: a new temporary directory
#
# Steps: photographs in a flat folder and a pair file of one's own → train → resume from the checkpoint alone →
# merge → evaluate; a TRL-layout parquet with embedded images mixed with the pair file; the flat folder as a
# LLaVA-format source → data=grid (augment, select, train); a 2×2 sweep by name.
set -euo pipefail

CHECKOUT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${MIADPO_VENV:-$CHECKOUT/.venv}"
if [ -x "$VENV/bin/miadpo-train" ]; then PATH="$VENV/bin:$PATH"; fi
command -v miadpo-train >/dev/null || { echo "miadpo is not installed (pip install miadpo, or make install)"; exit 1; }
PYTHON="$(dirname "$(command -v miadpo-train)")/python"
WORK="${1:-$(mktemp -d -t miadpo-first-hour-XXXX)}"
mkdir -p "$WORK" && cd "$WORK"
export WANDB_MODE=offline OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
COMMON=(model=tiny_llava logger=csv trainer.enable_progress_bar=false trainer.enable_model_summary=false)
START=$(date +%s.%N)
step() {  # step NAME COMMAND...: run it, print its time
    local name="$1" began
    shift
    began=$(date +%s.%N)
    "$@" > "$WORK/$name.log" 2>&1 || { echo "step $name failed (log: $WORK/$name.log)"; tail -30 "$WORK/$name.log"; exit 1; }
    awk -v name="$name" -v t0="$began" -v t1="$(date +%s.%N)" 'BEGIN { printf "%-28s %6.1f s\n", name, t1 - t0 }'
}
echo "first hour in $WORK (miadpo from $(dirname "$(command -v miadpo-train)"))"

# Photographs in a flat folder (scikit-image's samples), a pair file and a LLaVA-format source of one's own, and
# a TRL-layout parquet with the images embedded.
step "data" "$PYTHON" - <<'EOF'
import io, json
from pathlib import Path
import pyarrow as pa, pyarrow.parquet as pq, skimage.data
from PIL import Image
names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "clock", "brick",
         "colorwheel", "grass"]
Path("photos").mkdir(exist_ok=True)
for name in names:
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((96, 96)).save(f"photos/{name}.jpg")
pairs = [{"id": f"mine-{i}", "images": [f"{a}.jpg", f"{b}.jpg"],
          "prompt": "Image1: <image>\nImage2: <image>\nIn Image2, what is shown?", "chosen": f"A {b}.",
          "rejected": f"A {a}."} for i, (a, b) in enumerate(zip(names, names[1:] + names[:1]))]
Path("pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
source = [{"id": name, "image": f"{name}.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": f"A {name}."}]} for name in names]
Path("photos.json").write_text(json.dumps(source))
def png(name):
    buffer = io.BytesIO(); Image.open(f"photos/{name}.jpg").save(buffer, format="PNG"); return buffer.getvalue()
pq.write_table(pa.table({
    "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
               for _ in names],
    "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": f"A {n}."}]}] for n in names],
    "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": "A dog."}]}] for _ in names],
    "images": [[{"bytes": png(n), "path": None}] for n in names]}), "trl.parquet")
EOF

step "train (own pair file)" miadpo-train "${COMMON[@]}" data=pairs data.pairs=pairs.jsonl data.image_root=photos \
    data.val_fraction=0 data.batch_size=2 trainer.max_steps=4 checkpoint.every_n_train_steps=2 checkpoint.save_top_k=-1 \
    hydra.run.dir=runs/first
step "resume (ckpt_path alone)" miadpo-train ckpt_path=runs/first/checkpoints/epoch0-step2.ckpt \
    hydra.run.dir=runs/resumed
grep -q '"global_step": 4' runs/resumed/metrics.json
step "merge" miadpo-merge runs/resumed/adapter merged
step "evaluate" miadpo-evaluate model=tiny_llava model.path=merged eval.files=[photos.json] eval.image_root=photos \
    eval.progress=false hydra.run.dir=runs/eval
step "train (pairs + TRL parquet)" miadpo-train "${COMMON[@]}" data=pairs data.image_root=photos \
    "data.mix=[{pairs: pairs.jsonl}, {pairs: trl.parquet, columns: trl, weight: 0.5}]" data.val_fraction=0 \
    data.batch_size=2 trainer.max_steps=2 hydra.run.dir=runs/mix
step "train (flat folder, grid)" miadpo-train "${COMMON[@]}" data=grid data.source=photos.json data.image_root=photos \
    data.augment.grid.cell_size=64 data.augment.grid.band=16 data.augment.grid.font_size=12 data.augment.workers=1 \
    selection.generation.max_new_tokens=4 selection.min_perplexity=0 selection.right_answer_negatives=runner_up \
    "selection.thresholds.grid={2: 1, 3: 1, 4: 1, 5: 1, 6: 1, 7: 1, 8: 1, 9: 1}" "selection.operators.grid='<='" \
    data.val_fraction=0 data.batch_size=2 trainer.max_steps=2 hydra.run.dir=runs/grid
step "sweep 2x2 (by name)" miadpo-train -m --config-name sweep/beta "${COMMON[@]}" data=pairs data.pairs=pairs.jsonl \
    data.image_root=photos data.val_fraction=0 data.batch_size=2 trainer.max_steps=2 dpo.beta=0.1,0.3 \
    dpo=sigmoid,ipo hydra.sweep.dir=runs/sweep
test "$(grep -c done runs/sweep/summary.csv)" -eq 4

awk -v t0="$START" -v t1="$(date +%s.%N)" 'BEGIN { printf "%-28s %6.1f s\n", "total", t1 - t0 }'

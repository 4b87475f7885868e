"""Which decoder layer's attention tells a toy model's wrong answers from its right ones?

    python experiments/toyworld/selection_layers.py --base data/toyworld/base --records 1500 [--layers 0 1 2 3 4 5]

Selection (the real stage) on Sequence records of the toy train split, once per layer; for each layer and N,
the AUC of the attention ratio separating wrong answers (low ratio expected: the model looked elsewhere) from
right ones, and the median ratios. Appends a table to experiments/results/toyworld_selection_layers.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hydra import compose, initialize_config_dir

from miadpo.data.jsonl import read_jsonl
from miadpo.models import build_adapter
from miadpo.select.stage import CANDIDATES_FILE, run_selection
from miadpo.train import CONFIG_DIR

RESULTS = Path(__file__).resolve().parents[1] / "results" / "toyworld_selection_layers.md"


def auc(low: list[float], high: list[float]) -> float:
    """P(a random `low` value < a random `high` value), ties counted half (Mann–Whitney)."""
    ranked = sorted([(v, 0) for v in low] + [(v, 1) for v in high])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + j + 1) / 2  # average 1-based rank of the tie block
        rank_sum += mid * sum(1 for k in range(i, j) if ranked[k][1] == 1)
        i = j
    n_high, n_low = len(high), len(low)
    return (rank_sum - n_high * (n_high + 1) / 2) / max(1, n_high * n_low)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="data/toyworld/base")
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--layers", type=int, nargs="+", default=None)
    parser.add_argument("--out", default="outputs/selection_layers")
    args = parser.parse_args()
    lines = [f"\n## base {args.base}, {args.records} Sequence records of the train split\n",
             "| layer | N | right | wrong | median ratio right | median ratio wrong | AUC (right ratio > wrong) |",
             "|---|---|---|---|---|---|---|"]
    adapter = None
    layers = args.layers
    for layer in layers or [None]:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                "model=toy_llava", f"model.path={args.base}", "data=toy", f"data.augment.max_records={args.records}",
                f"data.out_dir={args.out}", f"selection.layer={layer if layer is not None else 'null'}"])
        adapter = adapter or build_adapter(cfg.model)
        adapter.model.eval()
        pairs = run_selection(adapter, cfg.data, cfg.selection, cfg.seed,
                              trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
        assert pairs is not None
        candidates = read_jsonl(pairs.parents[1] / CANDIDATES_FILE)
        for n in sorted({c["n_images"] for c in candidates}):
            group = [c for c in candidates if c["n_images"] == n and c["ratio"] is not None]
            right = [c["ratio"] for c in group if c["correct"]]
            wrong = [c["ratio"] for c in group if not c["correct"]]
            lines.append(f"| {group[0]['layer']} | {n} | {len(right)} | {len(wrong)} | {statistics.median(right):.3f} "
                         f"| {statistics.median(wrong):.3f} | {auc(wrong, right):.3f} |")
        print("\n".join(lines[-3:]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        if handle.tell() == 0:
            handle.write("# Toy world: attention ratio of right vs wrong answers, per selection layer\n\n"
                         "AUC 0.5: the layer's ratio does not tell wrong answers from right ones; the attention rule "
                         "(remove wrong answers with a high ratio) needs AUC clearly above 0.5.\n")
        handle.write("\n".join(lines) + "\n")
    print(json.dumps({"written": str(RESULTS)}))


if __name__ == "__main__":
    main()

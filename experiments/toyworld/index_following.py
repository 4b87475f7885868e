"""Does a toy base follow "Image k"? Its answers when the same question names another image.

    python experiments/toyworld/index_following.py --base data/toyworld/base [--records 1500]

Selection (the real stage, ``selection.right_answer_negatives=other_image``) on Sequence records of a toy split: for
every question the base answers right, the same question is asked about another image of the prompt. A model
that reads "Image k" changes its answer whenever that image shows something else; one that answers about
whichever image it likes repeats itself. Reports, per N, the accuracy and the share of right answers that change
(the ceiling is the share of those questions whose other image has another answer), and appends the table to
experiments/results/toyworld_index_following.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from miadpo.data.jsonl import read_jsonl
from miadpo.models import build_adapter
from miadpo.select.stage import CANDIDATES_FILE, run_selection
from miadpo.text import normalise_answer
from miadpo.train import CONFIG_DIR

HEADER = """# Toy world: does the base follow "Image k"?

For questions a base answers right, the same question about another image of the prompt
(`selection.right_answer_negatives=other_image`). The last column is the share of answers that changed among the
questions whose other image has another true answer: 100% for a model that reads the index, 0% for one that
ignores it.
"""
RESULTS = Path(__file__).resolve().parents[1] / "results" / "toyworld_index_following.md"


def true_answer(question: str, objects: list[dict]) -> str | None:
    """The toy answer to a question about a scene (colour / position / count), or None when it has none."""
    from miadpo.toyworld.scenes import COUNTS

    q = question.lower()
    if "how many" in q:
        return COUNTS[len(objects)]
    if "what colour is the object at the " in q:
        position = q.split("at the ")[1].rstrip("?")
        return next((o["colour"] for o in objects if o["position"] == position), None)
    if q.startswith("where is the "):
        colour = q[len("where is the "):].split(" object")[0]
        return next((o["position"] for o in objects if o["colour"] == colour), None)
    return None


def changed_answer(candidate: dict) -> bool:
    return normalise_answer(candidate["negative"]["answer"]) != normalise_answer(candidate["ground_truth"])


def other_image_answer(candidate: dict, scenes: dict[str, list[dict]]) -> str | None:
    """The true answer of the question asked about the other image."""
    question = candidate["prompt"].split(", ", 1)[1]
    return true_answer(question, scenes[candidate["images"][candidate["negative"]["asked_about"] - 1]])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", default="data/toyworld/base")
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--split-root", default=None,
                        help="toy directory whose val.json to use instead of the train split (e.g. data/eval1000)")
    parser.add_argument("--out", default=None, help="data directory (default outputs/index_following/<base name>)")
    args = parser.parse_args()
    split = "val" if args.split_root else "train"
    out = args.out or f"outputs/index_following/{Path(args.base).parent.name}-{Path(args.base).name}-{split}"
    source = [f"data.source={args.split_root}/val.json", f"data.image_root={args.split_root}/images"] \
        if args.split_root else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "model=toy_llava", f"model.path={args.base}", "data=toy", f"data.augment.max_records={args.records}",
            f"data.out_dir={out}", "selection.right_answer_negatives=other_image", *source])
    adapter = build_adapter(cfg.model)
    adapter.model.eval()
    pairs = run_selection(adapter, cfg.data, cfg.selection, cfg.seed,
                          trainer_kwargs={"accelerator": "cpu", "devices": 1, "enable_progress_bar": False})
    assert pairs is not None
    candidates = read_jsonl(pairs.parents[1] / CANDIDATES_FILE)
    scenes = {r["image"]: r["toy"]["objects"] for r in json.loads(Path(cfg.data.source).read_text())}
    lines = [f"\n## {args.base} ({args.records} Sequence records of the {split} split)\n",
             "| N | accuracy | right answers | changed when asked about another image | of those whose other image "
             "has another answer: changed |", "|---|---|---|---|---|"]
    for n in sorted({c["n_images"] for c in candidates}):
        group = [c for c in candidates if c["n_images"] == n]
        right = [c for c in group if c["correct"] and "negative" in c]
        changed = [c for c in right if changed_answer(c)]
        differs = [c for c in right if other_image_answer(c, scenes) not in (None, c["ground_truth"])]
        followed = [c for c in differs if changed_answer(c)]
        lines.append(f"| {n} | {100 * sum(c['correct'] for c in group) / len(group):.1f} | {len(right)} | "
                     f"{100 * len(changed) / max(1, len(right)):.1f}% | "
                     f"{100 * len(followed) / max(1, len(differs)):.1f}% ({len(differs)}) |")
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as handle:
        if handle.tell() == 0:
            handle.write(HEADER)
        handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""What the toy architecture reaches with ample multi-image supervision: the ceiling the DPO arms are measured against.

    python experiments/toyworld/ceiling.py [--augment-seeds 100 101] [--epochs 2] [--lr 5e-4]
        [--eval data/eval1000:val data/toyworld:test] [--results experiments/results/toyworld_ceiling]

The shipped toy base, fine-tuned further (full fine-tuning of the LLM, as the DPO recipe) on the ground truths of
6,000 fresh Sequence records per augmentation seed (drawn from the pool split, like the DPO data) plus the
single-image train split, then evaluated on the toy split(s) named. With the two default seeds that is 12,000
multi-image records against the 6,000 the DPO recipe augments and selects from, each supervised with its ground
truth.
Writes <results>.md and .json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from run import RESULTS, compose_config, evaluate_model, split_overrides  # the ablation script beside this one

from miadpo.augment.runner import RECORDS_FILE, run_augmentation
from miadpo.eval.scoring import multi_image_mean
from miadpo.sft import run_sft
from miadpo.toyworld.pipeline import ensure_toy_world

ROOT = Path("data/toyworld")
MAX_NEW_TOKENS = 8  # as the toy evaluation (conf/eval/toy.yaml)


def augment_pool(seed: int, work: Path, records: int) -> Path:
    """The toy recipe's augmentation of the pool split at ``seed``; returns its records file."""
    cfg = compose_config("train", ["data=toy", f"data.out_dir={work}/pool-seed{seed}",
                                   f"data.augment.max_records={records}"])
    run_augmentation(cfg.data, seed, progress=False)
    return Path(cfg.data.out_dir) / RECORDS_FILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--augment-seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--records", type=int, default=6000, help="Sequence records per augmentation seed")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eval", nargs="+", default=["data/eval1000:val", "data/toyworld:test"],
                        help="ROOT:SPLIT pairs to evaluate on")
    parser.add_argument("--work", default="outputs/ceiling")
    parser.add_argument("--results", default=str(RESULTS / "toyworld_ceiling"))
    args = parser.parse_args()
    start = time.time()
    work = Path(args.work)
    base = ROOT / "base"
    ensure_toy_world(ROOT, base)
    multi = [augment_pool(seed, work, args.records) for seed in args.augment_seeds]
    files = ",".join(map(str, [ROOT / "train.json", *multi]))
    overrides = ["model=toy_llava", f"model.path={base}", f"data.files=[{files}]",
                 f"data.image_root={ROOT / 'images'}", f"data.out_dir={work}", "data.batch_size=16",
                 "data.max_length=512", f"optim.lr={args.lr}", f"trainer.max_epochs={args.epochs}",
                 f"run_dir={work / 'sft'}", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                 "trainer.accelerator=cpu"]
    exported = run_sft(compose_config("sft", overrides))
    tables = {}
    for spec in args.eval:
        root, split = spec.split(":")
        tables[spec] = {name: evaluate_model(path, split_overrides(root, split), MAX_NEW_TOKENS, work / "evaluations")
                        for name, path in (("base", base), ("ceiling", exported))}
    minutes = (time.time() - start) / 60
    groups = ("sequence N=2", "sequence N=3", "sequence N=4", "single")
    lines = ["# Toy world: the architecture's ceiling with ample multi-image supervision\n",
             f"The shipped toy base fine-tuned (full fine-tuning of the LLM, lr {args.lr}, {args.epochs} epochs, batch "
             f"16) on the ground truths of {len(multi)} × {args.records:,} fresh Sequence records from the pool split "
             f"(augmentation seeds {args.augment_seeds}) plus the single-image train split; {minutes:.1f} min "
             "(`experiments/toyworld/ceiling.py`). The DPO recipe augments and selects 6,000 such records.\n",
             "| split | model | multi-image mean | " + " | ".join(groups) + " |",
             "|---|---|---|" + "---|" * len(groups)]
    for spec, by_model in tables.items():
        for name, table in by_model.items():
            lines.append(f"| {spec} | {name} | {multi_image_mean(table):.1f} | "
                         + " | ".join(f"{table[g]['accuracy']:.1f}" for g in groups) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    results = Path(args.results)
    results.with_suffix(".md").write_text(text)
    results.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "minutes": minutes,
                                                        "tables": tables}, indent=2) + "\n")


if __name__ == "__main__":
    main()

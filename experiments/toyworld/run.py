"""Toy-world ablation: base vs MIA-DPO vs its controls, over several seeds, paired per seed.

    python experiments/toyworld/run.py [--seeds 0 1 2] [--split test] [--arms ...] [--extra dpo.beta=0.1 ...]
        [--sft-lr 5e-4] [--data-dir '{work}/data-seed{seed}'] [--results PATH]

Arms (every one from the same toy base, through the real entry points with configs composed in process):
- MIA-DPO: the toy recipe (`conf/data/toy.yaml`);
- random selection: wrong answers drawn at random, as many per N as attention selection keeps;
- no post-selection: every `selection.post.*` bound off;
- perplexity ≤ 10: the recipe with the previous toy recipe's rejected-perplexity bound (chosen on one val seed,
  dropped when three seeds showed its cost);
- SFT on chosen: plain SFT (`miadpo.sft`) on MIA-DPO's chosen answers (same train pairs, batch size and epochs,
  hence the same steps; LoRA as in DPO), learning rate `--sft-lr` (tuned on val);
- rounds: the recipe with `rounds.count=2` (on-policy: round 2 selects with round 1's policy);
- MIA-DPO + conditional (+ anchor): the recipe on records augmented with image-side negatives (each record's
  asked-about image replaced by another pool scene, `data.augment.negatives.kind=replace`), trained with mDPO's
  conditional preference term (`dpo.conditional_weight=1`) and, in the second arm, its anchor
  (`dpo.anchor_weight=1`, δ = 0): mDPO's equal weighting, not tuned here. Their records live in
  `<data dir>-negatives` (another augmentation); their selection is the MIA-DPO arm's (checked: pairs in only one);
- MIA-DPO + conditional (companion): the same term with each negative taken from the record's own other images
  (`data.augment.negatives.kind=companion`: the image an element-interference error confuses with the target).
The arms of one seed share the augmented records and the candidates (only the rules differ). An arm that already
trained to the end with the same inputs (its `arm.json`) is not trained again, only evaluated on the split asked
for: the recipe's val runs are the test ablation's MIA-DPO arm. Evaluation is on the toy split named by --split
(the recipe was chosen on `val`; the ablation is reported on `test`).
Writes <results>.md, .json and .png (default experiments/results/toyworld.*).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw

from miadpo.data.jsonl import atomic_replace
from miadpo.data.pairs import ImageRoots
from miadpo.eval.items import llava_items
from miadpo.eval.scoring import evaluate
from miadpo.fingerprint import digest, weights_identity
from miadpo.models import build_adapter
from miadpo.rounds import run_rounds
from miadpo.sft import run_sft
from miadpo.toyworld.errors import ToyErrors
from miadpo.train import CONFIG_DIR, train

RESULTS = Path(__file__).resolve().parents[1] / "results"
NO_POST = [f"selection.post.{k}=null" for k in ("perplexity_min", "perplexity_max", "length_ratio_min",
                                                "length_ratio_max", "edit_similarity_min", "edit_similarity_max")]
IMAGE_NEGATIVES = ["data.augment.negatives.kind=replace"]
ARMS = {
    "MIA-DPO": ["selection=attention"],
    "random selection": ["selection=random"],
    "no post-selection": ["selection=attention", *NO_POST],
    "perplexity ≤ 10": ["selection=attention", "selection.post.perplexity_max=10.0"],  # the previous toy recipe
    "SFT on chosen": None,  # built from the MIA-DPO arm's pairs
    "rounds (2)": ["selection=attention", "rounds.count=2"],
    "MIA-DPO + conditional": ["selection=attention", *IMAGE_NEGATIVES, "dpo.conditional_weight=1.0"],
    "MIA-DPO + conditional + anchor": ["selection=attention", *IMAGE_NEGATIVES, "dpo.conditional_weight=1.0",
                                       "dpo.anchor_weight=1.0"],
    "MIA-DPO + conditional (companion)": ["selection=attention", "data.augment.negatives.kind=companion",
                                          "dpo.conditional_weight=1.0"],
}
METRICS = ("multi-image mean", "sequence N=2", "sequence N=3", "sequence N=4", "single")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def split_overrides(root: str, split: str) -> list[str]:
    """Evaluation on the toy split ``split`` under ``root`` (single-image questions and their Sequence form)."""
    return [f"eval.files=[{root}/{split}.json,{root}/{split}_sequences/records.jsonl]",
            f"eval.toy_source={root}/{split}.json", f"eval.image_root={root}/images", f"eval.out_dir={root}"]


def evaluation_key(cfg: DictConfig, max_new_tokens: int) -> str:
    """What an evaluation table depends on: the model's weights by content (a model retrained into the same
    directory is a new model), the evaluation settings and the generation length."""
    return digest([weights_identity(cfg.model), OmegaConf.to_container(cfg.eval, resolve=True), max_new_tokens])


def evaluate_model(path: str | Path, evaluation: list[str], max_new_tokens: int, cache: Path) -> dict[str, Any]:
    """The evaluation table of the model at ``path`` on the split of ``evaluation``, kept in ``cache``."""
    cfg = compose_config("evaluate", ["model=toy_llava", f"model.path={path}", *evaluation])
    cached = cache / f"eval-{evaluation_key(cfg, max_new_tokens)}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    adapter = build_adapter(cfg.model)
    items = [item for f in cfg.eval.files for item in llava_items(Path(f), ImageRoots.of(cfg.eval))]
    classify = ToyErrors.of_source(cfg.eval.toy_source)
    table = evaluate(adapter, items, cfg.eval.batch_size, max_new_tokens, classify).table
    with atomic_replace(cached) as tmp:  # two ablation processes may evaluate the base at once
        tmp.write_text(json.dumps(table, indent=1) + "\n")
    return table


def training_inputs(cfg: DictConfig) -> dict[str, Any]:
    """The composed config without its evaluation settings: what an arm's trained model depends on."""
    inputs = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    inputs.pop("eval", None)
    return json.loads(json.dumps(inputs, default=str))


def write_arm(run_dir: Path, done: dict[str, Any]) -> None:
    """Mark an arm as trained to the end (``arm.json``, replaced atomically so a kill never leaves half of it)."""
    with atomic_replace(run_dir / "arm.json") as tmp:
        tmp.write_text(json.dumps(done, indent=1) + "\n")


def finished_arm(run_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """What an arm that already trained to the end with the same inputs ``key`` left (``arm.json``), else None."""
    finished = run_dir / "arm.json"
    if finished.is_file():
        done = json.loads(finished.read_text())
        if done["key"] == key:
            return done
    return None


def negatives_suffix(overrides: list[str]) -> str:
    """The data directory suffix of an arm whose records carry image-side negatives (another augmentation)."""
    kinds = [o.split("=", 1)[1] for o in overrides if o.startswith("data.augment.negatives.kind=")]
    if not kinds:
        return ""
    return "-negatives" if kinds[-1] == "replace" else f"-negatives-{kinds[-1]}"


def run_dpo_arm(arm: str, seed: int, evaluation: list[str], extra: list[str], work: Path, data_dir: str
                ) -> dict[str, Any]:
    """One DPO arm: its before/after tables, pairs file and selection report.

    An arm already trained with the same composed config is not trained again; on another split it is re-evaluated.
    """
    run_dir = work / f"{re.sub(r'[^A-Za-z0-9.-]+', '_', arm).strip('_')}-seed{seed}"
    data_out = data_dir.format(work=work, seed=seed) + negatives_suffix(ARMS[arm] or [])
    overrides = ["model=toy_llava", "data=toy", f"seed={seed}", "logger=csv", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", f"run_dir={run_dir}", f"data.out_dir={data_out}",
                 *ARMS[arm], *extra]
    cfg = compose_config("train", [*overrides, *evaluation])
    if cfg.rounds.count > 1:
        records = run_rounds(cfg, train)
        tables = {"before": records[0]["evaluation"]["before"], "after": records[-1]["evaluation"]["after"]}
        return {"tables": tables, "pairs": records[0]["pairs"], "cfg": cfg,
                "per_round": [r["evaluation"]["after"]["multi-image mean"]["accuracy"] for r in records]}
    key = {"config": training_inputs(cfg)}  # a changed recipe file changes the key, unlike the overrides
    done = finished_arm(run_dir, key)
    if done is None:
        result = train(cfg)
        done = {"key": key, "evaluation": evaluation, "pairs": cfg.data.pairs, "exported": str(result.exported)}
        write_arm(run_dir, done)
    cfg.data.pairs = done["pairs"]
    if done["evaluation"] == evaluation:
        tables = json.loads((run_dir / "eval_before_after.json").read_text())
    else:
        tables = {moment: evaluate_model(path, evaluation, cfg.eval.max_new_tokens, work / "evaluations")
                  for moment, path in (("before", cfg.model.path), ("after", done["exported"]))}
    return {"tables": tables, "pairs": cfg.data.pairs, "cfg": cfg}


def pairs_as_sft_records(pairs: Path, out: Path) -> Path:
    """The chosen answers of a pair file as LLaVA records (first turn: prompt → chosen)."""
    with out.open("w", encoding="utf-8") as handle:
        for line in pairs.read_text().splitlines():
            pair = json.loads(line)
            handle.write(json.dumps({"id": pair["id"], "image": pair["images"], "conversations": [
                {"from": "human", "value": pair["prompt"]}, {"from": "gpt", "value": pair["chosen"]}]}) + "\n")
    return out


def run_sft_arm(dpo_cfg: DictConfig, seed: int, evaluation: list[str], lr: float, work: Path) -> dict[str, Any]:
    """Plain SFT on the DPO arm's chosen answers with the same steps, then the same evaluation."""
    run_dir = work / f"SFT_on_chosen-lr{lr:g}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    data = dpo_cfg.data
    model = dpo_cfg.model
    overrides = ["model=toy_llava", f"model.path={model.path}", f"model.lora.enabled={model.lora.enabled}",
                 f"model.lora.r={model.lora.r}", f"model.freeze_projector={model.freeze_projector}",
                 f"data.files=[{run_dir / 'chosen.jsonl'}]",
                 f"data.image_root={data.image_root}", f"data.out_dir={data.out_dir}",
                 f"data.batch_size={data.batch_size}", f"data.val_fraction={data.val_fraction}",
                 f"data.max_length={data.max_length}", f"optim.lr={lr}", f"seed={seed}", f"run_dir={run_dir}",
                 f"trainer.max_epochs={dpo_cfg.trainer.max_epochs}", "trainer.enable_progress_bar=false",
                 "trainer.enable_model_summary=false", "trainer.accelerator=cpu"]
    cfg = compose_config("sft", overrides)
    key = {"config": training_inputs(cfg), "pairs": str(data.pairs)}
    done = finished_arm(run_dir, key)
    if done is None:
        pairs_as_sft_records(Path(data.pairs), run_dir / "chosen.jsonl")
        done = {"key": key, "exported": str(run_sft(cfg))}
        write_arm(run_dir, done)
    table = evaluate_model(done["exported"], evaluation, dpo_cfg.eval.max_new_tokens, work / "evaluations")
    return {"tables": {"after": table}}


def selection_stats(pairs: str) -> dict[str, Any]:
    """Pairs kept and the attention rule's share of the wrong answers it removed (selection report)."""
    report = json.loads((Path(pairs).parent / "report.json").read_text())
    dropped = report["dropped"]
    by_attention = sum(v for k, v in dropped.items() if k.startswith("attention ratio"))
    not_wrong = sum(v for k, v in dropped.items() if k in ("answer matches the ground truth", "empty answer"))
    wrong = report["candidates"] - not_wrong
    kept = [json.loads(line) for line in Path(pairs).read_text().splitlines()]
    return {"pairs": report["pairs"], "wrong answers": wrong, "removed by attention": by_attention,
            "removed share %": 100.0 * by_attention / max(1, wrong),
            "pair ids": sorted(f"{p['id']}|{p['rejected']}" for p in kept)}


def image_term_stats(run_dir: Path) -> dict[str, Any]:
    """The image-side terms at the last training step (``metrics.json``) and the validation pairs' image accuracy
    after each epoch (the CSV log), for arms that train them."""
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    stats: dict[str, Any] = {name: metrics[key] for name, key in (
        ("image accuracy", "rewards/image_accuracies"), ("image margin", "rewards/image_margins"),
        ("conditional loss", "loss/conditional")) if key in metrics}
    for log in sorted(run_dir.glob("csv/version_*/metrics.csv"))[-1:]:
        with log.open() as handle:
            rows = [row for row in csv.DictReader(handle) if row.get("val/rewards/image_accuracies")]
        if rows:
            stats["val image accuracy per epoch"] = [round(float(r["val/rewards/image_accuracies"]), 3) for r in rows]
    return stats


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def paired(a: list[float], b: list[float]) -> str:
    """Per-seed differences a − b, their mean and a 95% t interval."""
    diffs = [x - y for x, y in zip(a, b)]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{[round(d, 1) for d in diffs]}, mean {mean:+.1f}"
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"per seed {[round(d, 1) for d in diffs]}, mean {mean:+.1f}, 95% CI [{mean - half:+.1f}, {mean + half:+.1f}]"


def plot(rows: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Bars of the multi-image mean and single-image accuracy per arm (mean over seeds)."""
    width, height, margin = 900, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    arms = list(rows)
    slot = (width - 2 * margin) / len(arms)
    for i, arm in enumerate(arms):
        for j, (metric, colour) in enumerate((("multi-image mean", (40, 90, 200)), ("single", (230, 140, 30)))):
            value = statistics.mean(rows[arm][metric])
            x0 = margin + i * slot + 10 + j * (slot - 20) / 2
            x1 = x0 + (slot - 20) / 2 - 4
            y1 = height - margin
            draw.rectangle((x0, y1 - (height - 2 * margin) * value / 100, x1, y1), fill=colour)
            draw.text((x0, y1 - (height - 2 * margin) * value / 100 - 12), f"{value:.1f}", fill="black")
        draw.text((margin + i * slot + 10, height - margin + 8), arm, fill="black")
    draw.text((margin, 10), "toy accuracy (%): blue = multi-image mean, orange = single-image", fill="black")
    image.save(path)


def ceiling_accuracy(path: Path, split: str) -> float | None:
    """The ceiling model's multi-image mean on ``split`` (``ROOT:SPLIT``) from ceiling.py's JSON, if it has it."""
    if not path.is_file():
        return None
    table = json.loads(path.read_text())["tables"].get(split)
    return None if table is None else table["ceiling"]["multi-image mean"]["accuracy"]


def write_results(args: argparse.Namespace, seeds: list[int], minutes: float, rows: dict[str, dict[str, list[float]]],
                  nothing: dict[str, list[float]], stats: dict[str, list[dict[str, Any]]],
                  rounds: list[list[float]]) -> None:
    """The table, paired differences and selection counts of the seeds run so far (.md, .json, .png)."""
    lines = ["# Toy world: seeded ablation\n",
             f"Toy world ({args.split} split), seeds {seeds}, extra overrides {args.extra or 'none'}, SFT arm lr "
             f"{args.sft_lr}; {minutes:.1f} min on this machine. DPO recipe: `conf/data/toy.yaml` (chosen on the val "
             "split, `toyworld_recipe_search.md`); mean ± std over seeds; each seed augments and selects its own "
             "records and its arms share the candidates.\n",
             "| arm | " + " | ".join(METRICS) + " | in no image % (multi) | base → ceiling gap closed |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    ceiling = ceiling_accuracy(Path(args.ceiling), f"{args.eval_root}:{args.split}") if args.ceiling else None
    for arm, metrics in rows.items():
        closed = "—"
        if ceiling is not None and "base" in rows:
            base = statistics.mean(rows["base"]["multi-image mean"])
            closed = f"{100 * (statistics.mean(metrics['multi-image mean']) - base) / (ceiling - base):.0f}%"
        lines.append(f"| {arm} | " + " | ".join(mean_std(metrics[m]) for m in METRICS) +
                     f" | {mean_std(nothing.get(arm, [0.0]))} | {closed} |")
    if ceiling is not None:
        lines.append(f"\nCeiling: {ceiling:.1f} multi-image mean on this split (`{Path(args.ceiling).name}`, "
                     "`experiments/toyworld/ceiling.py`).")
    lines.append("\nPaired per-seed differences (multi-image mean, then single):\n")
    for arm, control in (("MIA-DPO", "base"), ("MIA-DPO", "SFT on chosen"), ("MIA-DPO", "random selection"),
                         ("MIA-DPO", "no post-selection"), ("MIA-DPO", "perplexity ≤ 10"), ("rounds (2)", "MIA-DPO"),
                         ("MIA-DPO + conditional", "MIA-DPO"), ("MIA-DPO + conditional + anchor", "MIA-DPO"),
                         ("MIA-DPO + conditional + anchor", "MIA-DPO + conditional"),
                         ("MIA-DPO + conditional (companion)", "MIA-DPO"),
                         ("MIA-DPO + conditional (companion)", "MIA-DPO + conditional")):
        if arm in rows and control in rows:
            for metric in ("multi-image mean", "single"):
                lines.append(f"- {arm} − {control}, {metric}: {paired(rows[arm][metric], rows[control][metric])}")
    lines.append("\nSelection per seed:\n")
    for arm, per_seed in stats.items():
        lines.append(f"- {arm}: pairs {[s['pairs'] for s in per_seed]}, wrong answers "
                     f"{[s['wrong answers'] for s in per_seed]}, removed by the attention rule "
                     f"{[s['removed by attention'] for s in per_seed]} "
                     f"({[round(s['removed share %'], 1) for s in per_seed]} %)")
    for control in ("no post-selection", "perplexity ≤ 10", "MIA-DPO + conditional"):
        if "MIA-DPO" in stats and control in stats:
            differ = [len(set(a["pair ids"]) ^ set(b["pair ids"])) for a, b in zip(stats["MIA-DPO"], stats[control])]
            lines.append(f"- pairs in only one of MIA-DPO / {control}, per seed: {differ}")
    for arm, per_seed in stats.items():
        if per_seed and "image accuracy" in per_seed[0]:
            lines.append(f"- {arm}, last training step: share of pairs whose chosen answer gains more reward with the "
                         f"pair's images than with the negative {[round(s['image accuracy'], 3) for s in per_seed]}, "
                         f"image reward margin {[round(s['image margin'], 3) for s in per_seed]}, conditional loss "
                         f"{[round(s['conditional loss'], 3) for s in per_seed]} (per seed; one batch of 16 pairs); "
                         "the same share on the validation pairs after each epoch, per seed: "
                         f"{[s.get('val image accuracy per epoch') for s in per_seed]}")
    if rounds:
        lines.append(f"- rounds: multi-image mean after each round, per seed: {rounds}")
    text = "\n".join(lines) + "\n"
    print(text)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text(text)
    selection = {a: [{k: v for k, v in s.items() if k != "pair ids"} for s in p] for a, p in stats.items()}
    results.with_suffix(".json").write_text(json.dumps({"rows": rows, "in_no_image": nothing, "rounds": rounds,
                                                        "selection": selection, "args": vars(args),
                                                        "minutes": minutes}, indent=1) + "\n")
    plot(rows, results.with_suffix(".png"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--split", default="test")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--extra", nargs="*", default=[])
    parser.add_argument("--sft-lr", type=float, default=5e-4,
                        help="learning rate of the SFT arm (5e-4: tuned on val, toyworld_recipe_search.md)")
    parser.add_argument("--work", default="outputs/toyworld")
    parser.add_argument("--eval-root", default="data/toyworld", help="directory of the toy evaluation splits")
    parser.add_argument("--data-dir", default="{work}/data-seed{seed}",
                        help="data.out_dir of a seed's records and selection ({work} and {seed} are filled in)")
    parser.add_argument("--results", default=str(RESULTS / "toyworld"), help="writes <results>.md/.json/.png")
    parser.add_argument("--ceiling", default=str(RESULTS / "toyworld_ceiling.json"),
                        help="ceiling.py's results: the share of the base → ceiling gap each arm closes")
    args = parser.parse_args()
    evaluation = split_overrides(args.eval_root, args.split)
    if "SFT on chosen" in args.arms and "MIA-DPO" not in args.arms:
        parser.error("the SFT arm trains on the MIA-DPO arm's pairs: include MIA-DPO")
    start = time.time()
    rows: dict[str, dict[str, list[float]]] = {}
    nothing: dict[str, list[float]] = {}
    stats: dict[str, list[dict[str, Any]]] = {}
    rounds: list[list[float]] = []
    arms = ["MIA-DPO", *[a for a in args.arms if a != "MIA-DPO"]] if "MIA-DPO" in args.arms else args.arms
    for seed in args.seeds:
        mia: dict[str, Any] | None = None
        for position, arm in enumerate(arms):
            if arm == "SFT on chosen":
                assert mia is not None
                outcome = run_sft_arm(mia["cfg"], seed, evaluation, args.sft_lr, Path(args.work))
            else:
                outcome = run_dpo_arm(arm, seed, evaluation, args.extra, Path(args.work), args.data_dir)
                stats.setdefault(arm, []).append(selection_stats(outcome["pairs"]) |
                                                 image_term_stats(Path(outcome["cfg"].run_dir)))
                mia = outcome if arm == "MIA-DPO" else mia
                if "per_round" in outcome:
                    rounds.append(outcome["per_round"])
            tables = outcome["tables"]
            measured = [("after", arm)] + ([("before", "base")] if position == 0 else [])  # base once per seed
            for moment, name in measured:
                arm_rows = rows.setdefault(name, {m: [] for m in METRICS})
                for m in METRICS:
                    arm_rows[m].append(tables[moment][m]["accuracy"])
                multi = [tables[moment][g].get("in no image %", 0.0) for g in METRICS if " N=" in g]
                nothing.setdefault(name, []).append(statistics.mean(multi))
        write_results(args, args.seeds[: args.seeds.index(seed) + 1], (time.time() - start) / 60, rows, nothing,
                      stats, rounds)  # after every seed: a stopped run keeps what it measured


if __name__ == "__main__":
    main()

"""Accuracy of a model on LLaVA-format test files and on VLMEvalKit-style multiple-choice TSVs.

    python -m miadpo.evaluate model=toy_llava model.path=... eval.files=[test.json,records.jsonl] \\
        eval.toy_source=test.json eval.tsv=[BLINK.tsv]

Open answers are scored by normalised exact match (case, punctuation and spaces ignored), greedy and
deterministic, grouped by format and N (single-image records form the group "single"). With a toy source, each
wrong answer is classed: it names an attribute of a distractor image ("distractor", the element-interference
error), something in no image ("in no image", the collapse detector), or another attribute of the target
image ("other"). Multiple-choice TSVs (index, question, A–D, answer, image as base64 or a list of base64) are
scored by the first option letter of the answer. Writes ``eval.json`` and ``eval.md`` into the run directory.
"""

from __future__ import annotations

import ast
import base64
import csv
import io
import json
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from PIL import Image

from miadpo.augment.source import iter_raw_records
from miadpo.config import register_configs
from miadpo.datamodule import load_image
from miadpo.models import build_adapter
from miadpo.models.base import ModelAdapter
from miadpo.pairs import ImageRoots
from miadpo.select.candidates import normalise_answer
from miadpo.toyworld.scenes import COLOURS, COUNTS, POSITIONS, SHAPES, scene_index

register_configs()
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
OPTION_LETTERS = ("A", "B", "C", "D", "E", "F")
csv.field_size_limit(sys.maxsize)


@dataclass
class EvalItem:
    id: str
    group: str  # "single", "sequence N=3", "tsv:<name>", ...
    images: list[Image.Image]
    prompt: str
    answer: str
    image_paths: list[str] = field(default_factory=list)
    target: int = 1
    options: dict[str, str] = field(default_factory=dict)


def greedy_answers(adapter: ModelAdapter, items: Sequence[EvalItem], max_new_tokens: int) -> list[str]:
    return adapter.generate_answers([adapter.encode(item.images, item.prompt) for item in items], max_new_tokens)


def llava_items(path: Path, roots: ImageRoots) -> list[EvalItem]:
    """First question of each record; augmented records are grouped by format and N."""
    items = []
    for raw in iter_raw_records(path):
        if raw.error is not None:
            raise ValueError(f"{path}:{raw.line}: {raw.error}")
        record = raw.value
        image = record.get("image")
        paths = [] if image is None else ([image] if isinstance(image, str) else list(image))
        meta = record.get("meta") or {}
        if meta and meta["format"] != "single":
            group = f"{meta['format']} N={meta['n_images']}"
        else:
            group = "single" if len(paths) == 1 else f"{len(paths)} images"
        target = meta.get("target", 1)
        items.append(EvalItem(str(record["id"]), group, [load_image(roots.resolve(p)) for p in paths],
                              record["conversations"][0]["value"], record["conversations"][1]["value"],
                              list(meta.get("inputs") or paths), target[0] if isinstance(target, list) else target))
    return items


def _decode_images(cell: str) -> list[Image.Image]:
    encoded = ast.literal_eval(cell) if cell.lstrip().startswith("[") else [cell]
    return [Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB") for data in encoded]


def tsv_items(path: Path) -> list[EvalItem]:
    """VLMEvalKit multiple-choice layout: index, question, A, B, (C, D, ...), answer, image [, hint]."""
    items = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row_number, row in enumerate(csv.DictReader(handle, delimiter="\t"), start=2):
            try:
                images = _decode_images(row["image"])
                options = {k: row[k] for k in OPTION_LETTERS if row.get(k) not in (None, "", "nan")}
                hint = f"Hint: {row['hint']}\n" if row.get("hint") not in (None, "", "nan") else ""
                lines = "\n".join(f"{k}. {v}" for k, v in options.items())
                prompt = ("<image>\n" * len(images) + f"{hint}{row['question']}\nOptions:\n{lines}\n"
                          "Answer with the option's letter from the given choices directly.")
                items.append(EvalItem(str(row["index"]), f"tsv:{path.stem}", images, prompt, row["answer"].strip(),
                                      options=options))
            except (KeyError, ValueError, OSError) as exc:
                raise ValueError(f"{path}:{row_number}: {exc}") from exc
    return items


def option_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer picks: a leading letter ("B", "B.", "(B)"), else the option text it names."""
    match = re.match(r"\s*\(?([A-F])(?:[).:\s]|$)", answer)
    if match and match.group(1) in options:
        return match.group(1)
    named = [k for k, v in options.items() if normalise_answer(v) and normalise_answer(v) in normalise_answer(answer)]
    return named[0] if len(named) == 1 else None


ATTRIBUTE_VALUES = {"colour": set(COLOURS), "shape": set(SHAPES), "position": set(POSITIONS), "count": set(COUNTS)}


def attribute_of(answer: str) -> str | None:
    value = normalise_answer(answer)
    return next((kind for kind, values in ATTRIBUTE_VALUES.items() if value in values), None)


def classify_error(item: EvalItem, prediction: str, scenes: dict[str, list[dict[str, Any]]]) -> str:
    """distractor / in no image / other, for a wrong toy answer.

    distractor: the answer is the asked attribute (colour, shape, position) of an object in another image and
    not of the target's objects; in no image: no object of any image has it as any attribute; other: the rest
    (e.g. another attribute of the target image, or a wrong count).
    """
    kind = attribute_of(item.answer)
    value = normalise_answer(prediction)
    objects = [scenes.get(path, []) for path in item.image_paths]
    everything = {normalise_answer(str(o[k])) for image in objects for o in image for k in ("colour", "shape",
                                                                                            "position")}
    if kind in ("colour", "shape", "position") and objects:
        target = {o[kind] for o in objects[item.target - 1]}
        others = {o[kind] for i, image in enumerate(objects) if i != item.target - 1 for o in image}
        if value in others and value not in target:
            return "distractor"
    if value not in everything and value not in {"yes", "no", *COUNTS}:
        return "in no image"
    return "other"


def score(items: Sequence[EvalItem], predictions: Sequence[str], scenes: dict[str, list[dict[str, Any]]] | None
          ) -> dict[str, dict[str, float]]:
    """Per group: n, accuracy, and for toy answers the shares of errors by class (of all answers); with
    multi-image groups, a "multi-image mean" row (each format × N group weighted equally)."""
    groups: dict[str, list[tuple[EvalItem, str]]] = defaultdict(list)
    for item, prediction in zip(items, predictions):
        groups[item.group].append((item, prediction))
    table: dict[str, dict[str, float]] = {}
    for group, pairs in sorted(groups.items()):
        correct, classes = 0, defaultdict(int)
        for item, prediction in pairs:
            if item.options:
                ok = option_letter(prediction, item.options) == item.answer
            else:
                ok = normalise_answer(prediction) == normalise_answer(item.answer)
            correct += ok
            if not ok and scenes is not None and not item.options:
                classes[classify_error(item, prediction, scenes)] += 1
        row = {"n": len(pairs), "accuracy": 100.0 * correct / len(pairs)}
        if scenes is not None and not pairs[0][0].options:
            for name in ("distractor", "in no image", "other"):
                row[f"{name} %"] = 100.0 * classes[name] / len(pairs)
        table[group] = row
    mean = multi_image_mean(table)
    if mean is not None:
        table["multi-image mean"] = {"n": sum(r["n"] for g, r in table.items() if " N=" in g), "accuracy": mean}
    return table


def evaluate(adapter: ModelAdapter, items: Sequence[EvalItem], batch_size: int = 16, max_new_tokens: int = 8,
             scenes: dict[str, list[dict[str, Any]]] | None = None) -> tuple[dict[str, dict[str, float]], list[str]]:
    adapter.model.eval()
    predictions: list[str] = []
    for start in range(0, len(items), batch_size):
        predictions += greedy_answers(adapter, items[start : start + batch_size], max_new_tokens)
    return score(items, predictions, scenes), predictions


def table_markdown(table: dict[str, dict[str, float]]) -> str:
    columns = sorted({k for row in table.values() for k in row if k != "n"}, key=lambda k: (k != "accuracy", k))
    lines = ["| group | n | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for group, row in table.items():
        lines.append(f"| {group} | {int(row['n'])} | " + " | ".join(f"{row.get(c, 0.0):.1f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def multi_image_mean(table: dict[str, dict[str, float]]) -> float | None:
    """Mean accuracy over the multi-image groups (format × N), each group weighted equally."""
    values = [row["accuracy"] for group, row in table.items() if " N=" in group]
    return sum(values) / len(values) if values else None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    adapter = build_adapter(cfg.model)
    roots = ImageRoots.of(cfg.eval)
    items = [item for f in cfg.eval.files for item in llava_items(Path(f), roots)]
    items += [item for f in cfg.eval.tsv for item in tsv_items(Path(f))]
    scenes = scene_index(cfg.eval.toy_source) if cfg.eval.toy_source else None
    table, predictions = evaluate(adapter, items, cfg.eval.batch_size, cfg.eval.max_new_tokens, scenes)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval.json").write_text(json.dumps({"table": table, "predictions": dict(
        zip([i.id for i in items], predictions))}, indent=1))
    (run_dir / "eval.md").write_text(table_markdown(table))
    if cfg.eval.wandb:
        import wandb

        run = wandb.init(project=cfg.eval.wandb_project, dir=str(run_dir), mode=cfg.eval.wandb_mode,
                         job_type="evaluate")
        run.log({f"eval/{group}/{k}": v for group, row in table.items() for k, v in row.items()})
        run.log({"eval/table": wandb.Table(columns=["group", *next(iter(table.values()))],
                                           data=[[g, *r.values()] for g, r in table.items()])})
        run.finish()
    print(table_markdown(table))
    print(f"results: {run_dir.resolve() / 'eval.json'}")


if __name__ == "__main__":
    main()

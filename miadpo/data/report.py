"""What a training run's pairs look like: statistics, a ratio histogram and sample pairs with attention heat maps.

Written to ``<run_dir>/data_report/`` (``stats.json``, ``ratio_histogram.png``, ``samples.jsonl`` and one PNG per
sample) and, with the W&B logger, logged as a table (images, prompt, chosen, rejected, attention ratio, heat map),
a histogram and summary statistics.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from miadpo.data.images import load_record_image
from miadpo.data.pairs import ImageRoots, PairRecord

TILE = 160  # pixels per image in the sample strips


def pair_stats(records: Sequence[PairRecord], pairs_path: Path) -> dict[str, Any]:
    """Pairs per format and N, attention-ratio histogram, and the selection report beside the pairs (if any)."""
    groups = Counter(f"{r.meta.get('format', 'unknown')} N={r.meta.get('n_images', len(r.images))}" for r in records)
    ratios = [float(r.meta["attention_ratio"]) for r in records if r.meta.get("attention_ratio") is not None]
    counts, edges = np.histogram(ratios, bins=10, range=(0.0, 1.0))
    ratio = {"count": len(ratios), "mean": float(np.mean(ratios)) if ratios else None,
             "histogram": counts.astype(int).tolist(), "bin_edges": [round(float(e), 2) for e in edges]}
    stats: dict[str, Any] = {"pairs": len(records), "pairs_by_format": dict(sorted(groups.items())),
                             "attention_ratio": ratio}
    selection_report = pairs_path.parent / "report.json"
    if selection_report.is_file():
        report = json.loads(selection_report.read_text())
        stats["selection"] = {"candidates": report.get("candidates"), "dropped": report.get("dropped", {})}
    return stats


def heat_colour(share: float) -> tuple[int, int, int]:
    """0 → dark blue, 1 → yellow."""
    share = min(max(share, 0.0), 1.0)
    return int(30 + 225 * share), int(30 + 190 * share), int(120 * (1 - share))


def sample_strip(record: PairRecord, roots: ImageRoots) -> Image.Image:
    """The pair's images side by side; under each, its share of the answer's image attention (heat bar), with
    the attention map over the image when selection saved one; the target image framed."""
    images = [load_record_image(roots, p).resize((TILE, TILE)) for p in record.images]
    scores = record.meta.get("image_scores") or []
    total = sum(scores) or 1.0
    maps = record.meta.get("attention_maps") or []
    strip = Image.new("RGB", (TILE * len(images), TILE + 24), "white")
    draw = ImageDraw.Draw(strip)
    for k, image in enumerate(images):
        if k < len(maps) and maps[k].get("grids"):
            grid = maps[k]["grids"][0]
            values = np.asarray(grid["values"], dtype=np.float64).reshape(grid["rows"], grid["cols"])
            values = values / (values.max() or 1.0)
            heat = Image.fromarray(np.uint8(255 * values)).resize((TILE, TILE), Image.NEAREST).convert("L")
            image = Image.composite(Image.new("RGB", (TILE, TILE), (255, 60, 0)), image, heat.point(lambda v: v // 2))
        strip.paste(image, (k * TILE, 0))
        if k < len(scores):
            share = scores[k] / total
            draw.rectangle((k * TILE, TILE, (k + 1) * TILE - 1, TILE + 23), fill=heat_colour(share))
            draw.text((k * TILE + 4, TILE + 6), f"Image{k + 1}: {share:.0%}", fill="white")
        if record.meta.get("target") == k + 1 and len(record.images) > 1:  # the asked-about image of several
            draw.rectangle((k * TILE, 0, (k + 1) * TILE - 1, TILE - 1), outline=(0, 200, 0), width=3)
    return strip


def histogram_image(stats: dict[str, Any]) -> Image.Image:
    """The attention-ratio histogram of ``stats`` (``pair_stats``) as a bar chart image."""
    counts = stats["attention_ratio"]["histogram"]
    width, height, margin = 420, 220, 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = max(counts) or 1
    slot = (width - 2 * margin) / len(counts)
    for i, count in enumerate(counts):
        x0 = margin + i * slot
        draw.rectangle((x0 + 2, height - margin - (height - 2 * margin) * count / top, x0 + slot - 2,
                        height - margin), fill=(40, 90, 200))
        draw.text((x0 + 2, height - margin + 4), f"{i / len(counts):.1f}", fill="black")
    draw.text((margin, 8), f"attention ratio of the kept pairs (n={stats['attention_ratio']['count']})", fill="black")
    return image


def file_name(record_id: str, index: int) -> str:
    """``record_id`` as a file name: itself when it is one (letters, digits, ``._-``), else its sample index and
    the id with every other run of characters as ``_`` (ids from other tools hold ``/``, spaces, ...)."""
    if re.fullmatch(r"[A-Za-z0-9._-]+", record_id):
        return record_id
    return f"{index}_{re.sub(r'[^A-Za-z0-9._-]+', '_', record_id)}"


def write_data_report(records: Sequence[PairRecord], roots: ImageRoots, pairs_path: Path, run_dir: Path,
                      samples: int = 8) -> dict[str, Any]:
    """Write ``<run_dir>/data_report/`` and return what was written (stats, sample rows with their PNGs)."""
    out = run_dir / "data_report"
    out.mkdir(parents=True, exist_ok=True)
    stats = pair_stats(records, pairs_path)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    histogram_image(stats).save(out / "ratio_histogram.png")
    rows = []
    for index, record in enumerate(list(records)[:samples]):
        png = out / f"sample_{file_name(record.id, index)}.png"
        sample_strip(record, roots).save(png)
        rows.append({"id": record.id, "strip": str(png), "prompt": record.prompt, "chosen": record.chosen,
                     "rejected": record.rejected, "attention_ratio": record.meta.get("attention_ratio"),
                     "format": record.meta.get("format"), "n_images": len(record.images)})
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"stats": stats, "samples": rows, "histogram": str(out / "ratio_histogram.png")}


def log_data_report(experiment: Any, report: dict[str, Any]) -> None:
    """Log the report to a W&B run: samples table, ratio histogram, statistics in the summary."""
    import wandb

    table = wandb.Table(columns=["id", "images and attention", "prompt", "chosen", "rejected", "attention_ratio",
                                 "format", "n_images"])
    for row in report["samples"]:
        table.add_data(row["id"], wandb.Image(row["strip"]), row["prompt"], row["chosen"], row["rejected"],
                       row["attention_ratio"], row["format"], row["n_images"])
    experiment.log({"data/samples": table, "data/ratio_histogram": wandb.Image(report["histogram"])})
    stats = report["stats"]
    experiment.summary.update({"data/pairs": stats["pairs"],
                               **{f"data/pairs/{k}": v for k, v in stats["pairs_by_format"].items()},
                               **{f"data/dropped/{k}": v for k, v in stats.get("selection", {}).get("dropped",
                                                                                                     {}).items()}})

"""Augmentation throughput: composites per second for each format at 1 and 2 workers, beside the floor.

    python experiments/bench_augment.py [--records 192]

The source is scikit-image's bundled photographs (JPEG, 300–1411 px), copied to reach ``--records`` records of
one source. The floor is the JPEG work alone for the same composites: decoding their input images and
encoding the output pixels, in one process, with no resizing, pasting or drawing. Writes the table to
experiments/results/augment.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
from omegaconf import OmegaConf
from PIL import Image

from miadpo.augment.runner import RECORDS_FILE, run_augmentation
from miadpo.config import DataConfig
from miadpo.data.pairs import ImageRoots

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "coins",
          "moon", "page", "clock", "brick", "colorwheel", "camera", "grass", "gravel", "retina"]
RESULTS = Path(__file__).resolve().parent / "results" / "augment.md"


def make_source(root: Path, n_records: int) -> Path:
    (root / "images" / "coco").mkdir(parents=True)
    photos = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in PHOTOS]
    records = []
    for i in range(n_records):
        pixels = np.roll(photos[i % len(photos)], shift=i, axis=1)  # distinct files, same kind of content
        Image.fromarray(pixels).save(root / "images" / "coco" / f"{i}.jpg", quality=90)
        records.append({"id": str(i), "image": f"coco/{i}.jpg",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is this?"},
                                          {"from": "gpt", "value": "A photograph."}]})
    path = root / "llava.json"
    path.write_text(json.dumps(records))
    return path


def floor_seconds(out_dir: Path, roots: ImageRoots, quality: int) -> float:
    """JPEG decode of every input and encode of every output, nothing else."""
    records = [json.loads(line) for line in (out_dir / RECORDS_FILE).read_text().splitlines()]
    outputs = [np.asarray(Image.open(roots.resolve(r["image"])).convert("RGB"))
               for r in records if isinstance(r["image"], str)]
    start = time.perf_counter()
    for record in records:
        for rel in record["meta"]["inputs"]:
            with Image.open(roots.resolve(rel)) as image:
                image.convert("RGB")
    for pixels in outputs:
        Image.fromarray(pixels).save(io.BytesIO(), format="JPEG", quality=quality)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=192)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_source(root, args.records)
        for fmt in ("sequence", "grid", "pip"):
            floor = None
            for workers in (1, 2):
                out_dir = root / f"{fmt}-{workers}"
                cfg = OmegaConf.structured(DataConfig(source=str(source), image_root=str(root / "images"),
                                                      out_dir=str(out_dir)))
                cfg.formats = {"sequence": 0.0, "grid": 0.0, "pip": 0.0, fmt: 1.0}
                start = time.perf_counter()
                summary = run_augmentation(cfg, seed=0, workers=workers, progress=False)
                seconds = time.perf_counter() - start
                written = sum(summary.written.values())
                if floor is None:
                    floor_s = floor_seconds(out_dir, ImageRoots(root / "images", out_dir), cfg.augment.jpeg_quality)
                    floor = written / floor_s
                rows.append((fmt, workers, written, f"{seconds:.2f}", f"{written / seconds:.1f}", f"{floor:.1f}"))
    header = (f"Augmentation throughput, {args.records} records per format from scikit-image photographs, "
              f"{os.cpu_count()} CPU cores ({platform.machine()}). Wall time includes reading the source, "
              "planning and starting the workers.\n\n")
    table = ("| format | workers | records | seconds | composites/s | floor: JPEG decode+encode only, 1 process "
             "(composites/s) |\n|---|---|---|---|---|---|\n")
    table += "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in rows)
    print(header + table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(header + table)


if __name__ == "__main__":
    main()

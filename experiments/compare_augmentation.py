"""Whether two checkouts augment and prepare selection inputs byte for byte alike, on every format.

    python experiments/compare_augmentation.py <checkout A> <checkout B> --source <LLaVA JSON> --images <root>
        [--out experiments/results/X.md]

The default run covers Sequence and single records only; this covers what it does not: Sequence, single, Grid
(one- and two-question), Pic-in-Pic and refusal records, with each image-side negative kind (companion, noise,
replace). In each checkout (a fresh process with that checkout first on ``sys.path``) it augments ``--source``
250 records per kind, hashes every file written, then turns the records into selection inputs and noises the
first 80 records' selection images (noise on every format, both regions) and hashes those. Each checkout reports
its hashes; the report lists any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_default_runs import commit, write_report  # noqa: E402 (beside this script)

WORKER = r'''
import hashlib, json, sys
from pathlib import Path
import numpy as np
from omegaconf import OmegaConf
from miadpo.augment.runner import run_augmentation
from miadpo.config import DataConfig, NoiseConfig, SelectionConfig
from miadpo.data.images import ImageOptions
from miadpo.data.pairs import ImageRoots
from miadpo.select.candidates import CandidateGenerator, selection_inputs

source, images, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
report = {"files": {}, "selection": {}}
for kind in ("companion", "noise", "replace"):
    data = OmegaConf.structured(DataConfig(source=source, image_root=images, out_dir=str(out / kind)))
    data.formats = {"sequence": 1.0, "grid": 1.0, "pip": 1.0, "single": 0.5}
    data.augment.known_sources = ["toy"]
    data.augment.max_records = 250
    data.augment.refusal_fraction = 0.2
    data.augment.grid.records_per_grid = {1: 1.0, 2: 1.0}
    data.augment.negatives.kind = kind
    data.augment.workers = 1
    run_augmentation(data, 7, progress=False)
    records = [json.loads(line) for line in (out / kind / "records.jsonl").read_text().splitlines()]
    inputs, skipped = selection_inputs(records, 512)
    generator = object.__new__(CandidateGenerator)  # only its input images: no model
    generator.cfg = OmegaConf.structured(SelectionConfig(noise={
        "sequence": NoiseConfig(30.0, "whole"), "grid": NoiseConfig(225.0, "target"),
        "pip": NoiseConfig(49.0, "whole"), "single": NoiseConfig(10.0, "target")}))
    generator.seed, generator.images = 3, ImageOptions()
    generator.roots = ImageRoots(Path(images), out / kind)
    digest = hashlib.sha1(repr((inputs, sorted(skipped.items()))).encode())
    for item in inputs[:80]:
        for image in generator._images(item):
            digest.update(np.asarray(image).tobytes())
    formats = sorted({r["meta"]["format"] for r in records})
    report["selection"][kind] = {"inputs": len(inputs), "formats": formats, "sha1": digest.hexdigest()}
for path in sorted(out.rglob("*")):
    if path.is_file() and not path.name.endswith(".lock"):
        report["files"][str(path.relative_to(out))] = hashlib.sha1(path.read_bytes()).hexdigest()
print(json.dumps(report))
'''


def run(checkout: Path, source: Path, images: Path) -> dict:
    """The worker's report, run with ``checkout``'s package."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "PYTHONPATH": str(checkout.resolve())}
        done = subprocess.run([sys.executable, "-c", WORKER, str(source), str(images), out], env=env,
                              capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    left, right = run(args.a, args.source, args.images), run(args.b, args.source, args.images)
    lines = [f"# Augmentation and selection inputs: {args.a} (commit {commit(args.a)}) against {args.b} "
             f"(commit {commit(args.b)})", "", f"Source: {args.source} (250 records per negative kind, seed 7).", ""]
    names = sorted(left["files"].keys() | right["files"].keys())
    differing = [n for n in names if left["files"].get(n) != right["files"].get(n)]
    lines += [f"Files written: {len(left['files'])} against {len(right['files'])}; "
              f"byte-identical: {len(names) - len(differing)} of {len(names)}."]
    lines += [f"- {name}: differs" for name in differing]
    lines += ["", "| negative kind | formats | selection inputs | inputs and noised images |", "|---|---|---|---|"]
    for kind, row in right["selection"].items():
        same = "identical" if left["selection"][kind] == row else "DIFFERENT"
        lines.append(f"| {kind} | {', '.join(row['formats'])} | {row['inputs']} | {same} |")
    write_report(lines, args.out)


if __name__ == "__main__":
    main()

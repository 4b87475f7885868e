"""Whether two checkouts' default runs (``python -m miadpo.train`` in each, already run) wrote the same files.

    python experiments/compare_default_runs.py <checkout A> <checkout B> [--out experiments/results/X.md]

Every JSON/JSONL/markdown/safetensors file under ``data/`` and ``outputs/train/<run>/`` (W&B files and the copied
toy base left out) is hashed; run directories are matched by position (one run each) and the reference cache's
model-key folder by name. A file that differs is explained where the difference is known to be by design: the
reference cache's per-pair keys hash each image's modification time (the logps themselves are compared), and
the data report's sample strips name the run's absolute path (compared with the path replaced).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
from pathlib import Path

SUFFIXES = {".json", ".jsonl", ".md", ".safetensors"}


def files(checkout: Path) -> dict[str, Path]:
    runs = sorted((checkout / "outputs" / "train").iterdir())
    if len(runs) != 1:
        raise SystemExit(f"{checkout}: expected one run in outputs/train, found {len(runs)}")
    out = {}
    for root in (checkout / "data", runs[0]):
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(checkout).as_posix()
            if path.is_file() and path.suffix in SUFFIXES and "wandb" not in rel and "/base/" not in rel:
                out[rel.replace(runs[0].relative_to(checkout).as_posix(), "outputs/train/RUN")] = path
    return out


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:12]


def explained(name: str, a: Path, b: Path) -> str | None:
    if "reference_logps" in name:
        rows = [[json.loads(line)["logps"] for line in p.read_text().splitlines()] for p in (a, b)]
        return "per-pair keys differ (image mtimes); logps identical" if rows[0] == rows[1] else None
    if name.endswith("data_report/samples.jsonl"):
        texts = [re.sub(r'"strip": "[^"]*/data_report/', '"strip": "RUN/data_report/', p.read_text()) for p in (a, b)]
        return "identical but for the run's absolute path in each strip" if texts[0] == texts[1] else None
    if name.endswith("metrics.json"):
        values = [json.loads(p.read_text()) for p in (a, b)]
        only = set(values[0]) ^ set(values[1])
        same = all(values[0][k] == values[1][k] for k in set(values[0]) & set(values[1]))
        return f"same values; keys in one only: {sorted(only)}" if same else None
    return None


def commit(checkout: Path) -> str:
    done = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    left, right = files(args.a), files(args.b)
    lines = [f"# Default run: {args.a} (commit {commit(args.a)}) against {args.b} (commit {commit(args.b)})", "",
             f"{len(left)} files against {len(right)}.", ""]
    for name in sorted(left.keys() | right.keys()):
        if name not in left or name not in right:
            lines.append(f"- {name}: only in {'A' if name in left else 'B'}")
            continue
        a, b = left[name].read_bytes(), right[name].read_bytes()
        if a != b:
            why = explained(name, left[name], right[name])
            lines.append(f"- {name}: differs ({digest(a)} vs {digest(b)}): {why or 'UNEXPLAINED'}")
    identical = sum(left[n].read_bytes() == right[n].read_bytes() for n in left.keys() & right.keys())
    lines += ["", f"byte-identical: {identical} of {len(left.keys() & right.keys())}"]
    table = "outputs/train/RUN/eval_before_after.md"
    if table in left and table in right:
        same = left[table].read_bytes() == right[table].read_bytes()
        lines += ["", f"The toy test table (`{table}`) is {'byte-identical' if same else 'DIFFERENT'}; B's:", "",
                  right[table].read_text().rstrip()]
    write_report(lines, args.out)


def write_report(lines: list[str], out: Path | None) -> None:
    """Prints the report and writes it to ``out`` (first, so that a closed pipe cannot lose it)."""
    text = "\n".join(lines) + "\n"
    if out:
        out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

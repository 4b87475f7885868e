"""Preference sets as users already have them, converted into pair records (``data.columns``).

``data.pairs`` names miadpo's pair file (JSONL or JSON, the official MIA-DPO release too: ``data.columns`` null)
or, with ``data.columns``, a preference set of another layout — a JSONL / JSON file, a parquet file, or a folder of
them (a hub dataset's shards, read in name order):

- ``data.columns=trl``: TRL's vision preference layout. ``prompt``, ``chosen``, ``rejected`` are strings or
  conversational messages (``[{"role": ..., "content": "..." | [{"type": "text", "text": ...}, {"type":
  "image"}]}]``, an image item standing where its ``<image>`` goes); ``images`` a list of paths or of image
  structs (``{"bytes": ..., "path": ...}``, as parquet stores a datasets Image).
- ``data.columns=rlaif_v``: RLAIF-V's published columns (``question``, ``chosen``, ``rejected``, ``image`` struct,
  ``idx``).
- a mapping ``{id, prompt, chosen, rejected, images}`` of column names (``id`` null: the row's ``id`` if it has
  one, else ``row-<number>``).

Embedded image bytes are written once under ``<data.out_dir>/images/embedded/``, named by the SHA-256 of their
bytes, and the pairs point at them as ``@out/images/embedded/<name>``: a rerun (or another set holding the same
image) reuses the file. A prompt without ``<image>`` markers gets one per image, in order, before the text. A
row that does not fit (a missing or mistyped column, an undecodable image, more markers than images) is a bad
record named by its file and row (``data.on_bad_record``). The converted pairs are written to
``<data.out_dir>/converted/<fingerprint>/pairs.jsonl`` (keyed by the files' content and the mapping), so a rerun
converts nothing. ``data.mix`` trains several sets together with weights (``mix_pair_sets``).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError

from miadpo.data.jsonl import atomic_replace, iter_raw_records
from miadpo.data.pairs import COMPOSED_PREFIX, BadRecord, BadRecordReport, PairRecord, parse_pair
from miadpo.fingerprint import digest, file_sha1
from miadpo.text import IMAGE_TOKEN

ROLES = ("id", "prompt", "chosen", "rejected", "images")
PRESETS: dict[str, dict[str, str | None]] = {
    "trl": {"id": None, "prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "images": "images"},
    "rlaif_v": {"id": "idx", "prompt": "question", "chosen": "chosen", "rejected": "rejected", "images": "image"},
}
EMBEDDED_DIR = "images/embedded"
CONVERSION_VERSION = 1
TABLE_SUFFIXES = (".parquet", ".jsonl", ".json")


def column_mapping(columns: Any) -> dict[str, str | None]:
    """``data.columns`` as a mapping role → column: a preset's, or the user's (each role named or defaulted to the
    TRL name; ``id`` may be null)."""
    if isinstance(columns, str):
        if columns not in PRESETS:
            raise ValueError(f"data.columns={columns!r}: no such preset; presets: {sorted(PRESETS)}, or a mapping "
                             f"of {list(ROLES)} to column names")
        return dict(PRESETS[columns])
    mapping = OmegaConf.to_container(columns) if isinstance(columns, DictConfig) else dict(columns)
    unknown = sorted(set(mapping) - set(ROLES))  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"data.columns: unknown role(s) {unknown}; a mapping names columns for {list(ROLES)}")
    return {**PRESETS["trl"], **mapping}  # type: ignore[dict-item]


def table_files(path: Path) -> list[Path]:
    """The files of a preference set: ``path`` itself, or its folder's parquet / JSONL / JSON files by name."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TABLE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"data.pairs={path}: a folder with no {'/'.join(TABLE_SUFFIXES)} file")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"data.pairs={path}: no such file or folder")
    return [path]


def _import_parquet() -> Any:
    try:
        import pyarrow.parquet
    except ImportError as exc:
        raise ImportError("reading a parquet preference set needs pyarrow: pip install 'miadpo[preferences]'") from exc
    return pyarrow.parquet


def iter_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(row number, 1-based: the line for JSONL / JSON; the row for parquet, value, error) of one file."""
    if path.suffix != ".parquet":
        for raw in iter_raw_records(path):
            yield raw.line, raw.value, raw.error
        return
    row = 0
    for batch in _import_parquet().ParquetFile(str(path)).iter_batches(batch_size=256):
        for value in batch.to_pylist():
            row += 1
            yield row, value, None


def message_text(value: Any, column: str) -> str:
    """A string, or conversational messages as one string (text items joined, an image item as ``<image>``)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise ValueError(f"column {column!r}: neither a string nor a list of messages with 'content'")
    pieces = []
    for message in value:
        content = message["content"]
        if isinstance(content, str):
            pieces.append(content)
            continue
        if not isinstance(content, list):
            raise ValueError(f"column {column!r}: a message's content is neither a string nor a list of items")
        for item in content:
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "image":
                pieces.append(IMAGE_TOKEN)
            elif kind == "text" and isinstance(item.get("text"), str):
                pieces.append(item["text"])
            else:
                raise ValueError(f"column {column!r}: content item {item!r} is neither text nor an image")
    return "".join(pieces)


def embedded_image(data: bytes, out_dir: Path, column: str) -> str:
    """Image bytes written once under ``out_dir`` by content hash; their ``@out/`` path."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
            suffix = (image.format or "png").lower().replace("jpeg", "jpg")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"column {column!r}: embedded bytes are not an image ({exc})") from None
    name = f"{hashlib.sha256(data).hexdigest()[:32]}.{suffix}"
    target = out_dir / EMBEDDED_DIR / name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_replace(target) as tmp:
            tmp.write_bytes(data)
    return f"{COMPOSED_PREFIX}{EMBEDDED_DIR}/{name}"


def image_paths(value: Any, out_dir: Path, column: str) -> list[str]:
    """A row's images (a path, an image struct, or a list of them) as pair-record paths."""
    items = value if isinstance(value, list) else [value]
    paths = []
    for item in items:
        if isinstance(item, str) and item:
            paths.append(item)
        elif isinstance(item, dict) and isinstance(item.get("bytes"), (bytes, bytearray)) and item["bytes"]:
            paths.append(embedded_image(bytes(item["bytes"]), out_dir, column))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and item["path"]:
            paths.append(item["path"])
        else:
            raise ValueError(f"column {column!r}: {type(item).__name__} is neither an image path nor an image "
                             "struct with bytes or a path")
    if not paths:
        raise ValueError(f"column {column!r}: no image")
    return paths


def row_pair(row: Any, number: int, columns: dict[str, str | None], out_dir: Path) -> PairRecord:
    """One row as a pair record (ValueError naming the column that does not fit)."""
    if not isinstance(row, dict):
        raise ValueError("row is not an object")
    for role in ROLES:
        column = columns[role]
        if column is not None and column not in row:
            raise ValueError(f"column {column!r} ({role}) missing; the row has {sorted(row)}")
    images = image_paths(row[columns["images"]], out_dir, str(columns["images"]))
    prompt = message_text(row[columns["prompt"]], str(columns["prompt"]))
    if IMAGE_TOKEN not in prompt:
        prompt = f"{IMAGE_TOKEN}\n" * len(images) + prompt
    row_id = row[columns["id"]] if columns["id"] is not None else row.get("id", f"row-{number}")
    record = {"id": str(row_id), "images": images,
              "prompt": prompt, "chosen": message_text(row[columns["chosen"]], str(columns["chosen"])),
              "rejected": message_text(row[columns["rejected"]], str(columns["rejected"]))}
    return parse_pair(record)


def convert_preferences(pairs: str | Path, columns: Any, out_dir: str | Path, report: BadRecordReport) -> Path:
    """The preference set ``pairs`` (``data.columns`` layout) as a miadpo pair file under ``out_dir``; converted
    once per content and mapping."""
    files = table_files(Path(pairs))
    mapping = column_mapping(columns)
    out_dir = Path(out_dir)
    key = digest({"files": [[str(f), file_sha1(f)] for f in files], "columns": mapping,
                  "version": CONVERSION_VERSION}, "sha1", 16)
    target = out_dir / "converted" / key / "pairs.jsonl"
    if target.is_file():
        return target
    records: list[PairRecord] = []
    for path in files:
        for number, row, error in iter_rows(path):
            report.total += 1
            try:
                if error is not None:
                    raise ValueError(error)
                records.append(row_pair(row, number, mapping, out_dir))
            except ValueError as exc:
                row_id = row.get(mapping["id"] or "id") if isinstance(row, dict) else None
                report.add(BadRecord(str(path), number, None if row_id is None else str(row_id), str(exc)))
    report.finish()
    if not records:
        raise ValueError(f"data.pairs={pairs} (data.columns={columns}): no row converts to a pair")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(target) as tmp:
        tmp.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records),
                       encoding="utf-8")
    return target


def mix_pair_sets(sets: Sequence[Any], out_dir: str | Path, seed: int, on_bad_record: Any,
                  max_bad_fraction: float) -> Path:
    """The pair sets of ``data.mix`` (each ``{pairs, columns, weight}``) as one pair file under
    ``<out_dir>/mixed/<fingerprint>/``: each set converted as ``convert_preferences`` does when it has ``columns``,
    then taken ``weight`` times (the whole part repeated, the fraction a seeded sample); ids become
    ``<set>/<id>`` (and ``#<k>`` for a repeat), so sets may share ids."""
    out_dir = Path(out_dir)
    files = []
    for index, pair_set in enumerate(sets):
        if pair_set.weight < 0:
            raise ValueError(f"data.mix[{index}].weight={pair_set.weight}: a weight is 0 or more")
        path = Path(pair_set.pairs)
        if pair_set.columns is not None:
            report = BadRecordReport(on_bad_record, max_bad_fraction, stage=f"preferences {index}")
            path = convert_preferences(path, pair_set.columns, out_dir, report)
        elif not path.is_file():
            raise FileNotFoundError(f"data.mix[{index}].pairs={path}: no such file")
        files.append((path, float(pair_set.weight)))
    key = digest({"sets": [[str(p), file_sha1(p), w] for p, w in files], "seed": seed,
                  "version": CONVERSION_VERSION}, "sha1", 16)
    target = out_dir / "mixed" / key / "pairs.jsonl"
    if target.is_file():
        return target
    lines = []
    for index, (path, weight) in enumerate(files):
        report = BadRecordReport(on_bad_record, max_bad_fraction, stage=f"mix {index}")
        records = []
        for raw in iter_raw_records(path):  # a line that is no JSON object is named here, at its own file and line
            report.total += 1
            if raw.error is None and isinstance(raw.value, dict):
                records.append(raw)
            else:
                report.add(BadRecord(str(path), raw.line, None, raw.error or "record is not a JSON object"))
        report.finish()
        rng = random.Random(f"{seed}-{index}")
        whole, fraction = int(weight), weight - int(weight)
        picks = [(k, raw) for k in range(whole) for raw in records]
        picks += [(whole, raw) for raw in sorted(rng.sample(records, round(fraction * len(records))),
                                                 key=lambda raw: raw.index)]
        for repeat, raw in picks:
            record = dict(raw.value)
            record["id"] = f"{index}/{record.get('id')}" + (f"#{repeat}" if repeat else "")  # unique across sets
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if not lines:
        raise ValueError("data.mix: every set has weight 0 or no pair")
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(target) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return target

"""The pair record: the data contract between selection and training.

A pair file is JSONL, one pair per line::

    {"id": "seq-000017", "images": ["coco/train2017/000000123.jpg", "@out/grid/seq-000017.png"],
     "prompt": "Image1: <image>\\nImage2: <image>\\nIn Image2, what is the man holding?",
     "chosen": "A red umbrella.", "rejected": "A surfboard.",
     "rejected_images": ["coco/train2017/000000123.jpg", "coco/train2017/000000456.jpg"],
     "meta": {"format": "sequence", "n_images": 2, "target": 2, ...}}

``rejected_images`` (optional) is the image-side negative: ``images`` with only the image the question asks about
changed (``data.augment.negatives``); the conditional preference term (``dpo.conditional_weight``) reads it.

Path rule (one rule for every stage): a path that starts with ``@out/`` is a composed image and resolves
under ``data.out_dir``; every other path is a source photograph and resolves under ``data.image_root``.
Absolute paths and paths with ``..`` components are rejected; a symlinked folder inside a root (``images/coco ->
/mnt/coco``) is followed unless ``data.follow_symlinks=false``. ``chosen`` and ``rejected`` hold no image marker.

The reader also accepts the official MIA-DPO release as its generator scripts write it: a JSON array
(``json.dump(..., indent=4)``) instead of JSONL; ``image`` (a path or a list of paths) instead of ``images``; no
``meta``; ``<image-placeholder>`` as the image marker (read as ``<image>``); and the reference training code's rule
for a single ``image`` string: any marker in the prompt is dropped and one ``<image>\n`` is prepended.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from miadpo.config import BadRecordPolicy, ImageSourceConfig
from miadpo.data.images import ImageError, ImageOptions, check_record_image, load_record_image
from miadpo.data.jsonl import atomic_replace, iter_raw_records
from miadpo.fingerprint import digest
from miadpo.text import IMAGE_TOKEN, RELEASE_IMAGE_TOKEN, image_marker_in, normalise_answer, shown

log = logging.getLogger(__name__)
_LEFT_ROOT: set[Path] = set()  # roots a followed symlink was seen leaving (logged once each)

COMPOSED_PREFIX = "@out/"


@dataclass
class PairRecord:
    """One pair of a pair file (see the module docstring): images, prompt, chosen and rejected answers, ``meta`` and the
    optional image-side negative."""

    id: str
    images: list[str]
    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)
    # The image-side negative: ``images`` with only the asked-about image changed (one path per image), or None.
    rejected_images: list[str] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as one pair-file JSON object (``rejected_images`` only when set)."""
        data: dict[str, Any] = {
            "id": self.id,
            "images": list(self.images),
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
        }
        if self.rejected_images is not None:
            data["rejected_images"] = list(self.rejected_images)
        data["meta"] = self.meta
        return data


@dataclass(frozen=True)
class ImageRoots:
    """Where the two kinds of record path live (see the module docstring).

    With ``follow_symlinks`` (``data.follow_symlinks``, the default) a symlink inside a root may point anywhere
    (``images/coco -> /mnt/coco``); without, a path whose real location leaves its root is refused. Either way a
    record path must be relative and free of ``..`` components (checked on the text, before any link is followed).
    """

    image_root: Path
    out_dir: Path
    follow_symlinks: bool = True

    @classmethod
    def of(cls, cfg: ImageSourceConfig) -> ImageRoots:
        """The roots an image-source config names (``data``, SFT data, ``eval``)."""
        return cls(Path(cfg.image_root), Path(cfg.out_dir), bool(cfg.follow_symlinks))

    def resolve(self, rel_path: str) -> Path:
        """Resolve a record path; raises ValueError for absolute paths or paths escaping their root."""
        if rel_path.startswith(COMPOSED_PREFIX):
            root, rest = self.out_dir, rel_path[len(COMPOSED_PREFIX) :]
        else:
            root, rest = self.image_root, rel_path
        if not rest or os.path.isabs(rest) or Path(rest).is_absolute():
            raise ValueError(f"image path {rel_path!r} must be relative to its root")
        root = root.resolve()
        if ".." in Path(rest).parts:
            raise ValueError(f"image path {rel_path!r} escapes its root {root} ('..' is not allowed)")
        path = root / rest
        if self.follow_symlinks:
            if root not in _LEFT_ROOT:  # a link out of the root is allowed; said once per root
                resolved = path.resolve()
                if not resolved.is_relative_to(root):
                    _LEFT_ROOT.add(root)
                    log.warning("image path %r leaves its root %s through a symlink (to %s): used, as "
                                "follow_symlinks=true allows (said once per root)", rel_path, root, resolved)
            return path
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ValueError(f"image path {rel_path!r} leaves its root {root} through a symlink (to {resolved}; "
                             "data.follow_symlinks=false)")
        return resolved

    def composed(self, path: Path) -> str:
        """The record path of a file written under ``out_dir`` (also through a symlinked folder in it)."""
        for file, root in ((os.path.abspath(path), os.path.abspath(self.out_dir)),
                           (os.path.abspath(path), self.out_dir.resolve())):
            if Path(file).is_relative_to(root):
                return COMPOSED_PREFIX + Path(file).relative_to(root).as_posix()
        return COMPOSED_PREFIX + path.resolve().relative_to(self.out_dir.resolve()).as_posix()


@dataclass(frozen=True)
class BadRecord:
    """A record's file, line and id (None when unknown) with the reason it is bad (or, as a note, was adjusted)."""

    file: str
    line: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        return f"{shown(self.file)}:{self.line} (id={shown(self.id)}): {self.reason}"


class BadRecordError(ValueError):
    """Raised when a data file has bad records and the policy (or the bad fraction) says stop."""


@dataclass
class BadRecordReport:
    """Counts bad records for one stage and applies ``<settings>.on_bad_record`` / ``<settings>.max_bad_fraction``
    (``settings``: the config group that holds them, ``data`` or ``eval``, named in its messages)."""

    policy: BadRecordPolicy = BadRecordPolicy.skip
    max_bad_fraction: float = 0.01
    stage: str = "load"
    bad: list[BadRecord] = field(default_factory=list)
    total: int = 0
    settings: str = "data"
    # Records kept after a change the source's own rules make (e.g. Mantis-Eval's surplus <image> markers as text).
    notes: list[BadRecord] = field(default_factory=list)
    # Whole parts left out (``skip_whole``): "<part>: <reason and how to supply it>".
    not_evaluated: list[str] = field(default_factory=list)

    def add(self, record: BadRecord) -> None:
        """Count a bad record: raise ``BadRecordError`` under ``on_bad_record=error``, else log it as skipped."""
        self.bad.append(record)
        if BadRecordPolicy(self.policy) is BadRecordPolicy.error:
            raise BadRecordError(f"[{self.stage}] bad record ({self.settings}.on_bad_record=error): {record}")
        log.warning("[%s] skipping bad record %s", self.stage, record)

    def skip_whole(self, part: str, reason: str) -> None:
        """A whole part of the input (a benchmark task none of whose media exist) left out: named with the reason,
        logged, not counted as bad records."""
        self.not_evaluated.append(f"{part}: {reason}")
        log.warning("[%s] not evaluated: %s: %s", self.stage, part, reason)

    def note(self, record: BadRecord) -> None:
        """A record kept, adjusted as its source's rules say: counted and logged, not bad."""
        self.notes.append(record)
        log.warning("[%s] kept %s", self.stage, record)

    @property
    def fraction(self) -> float:
        """The share of the records read that are bad (0.0 before any is read)."""
        return len(self.bad) / self.total if self.total else 0.0

    def finish(self) -> None:
        """Log the summary; raise if every record was bad or the bad fraction is above the limit."""
        if not self.bad:
            return
        reasons: dict[str, int] = {}
        for record in self.bad:
            key = record.reason.split(":")[0]
            reasons[key] = reasons.get(key, 0) + 1
        summary = ", ".join(f"{n}× {reason}" for reason, n in sorted(reasons.items()))
        log.warning("[%s] skipped %d of %d records: %s", self.stage, len(self.bad), self.total, summary)
        if len(self.bad) >= self.total or self.fraction > self.max_bad_fraction:
            first = "\n  ".join(str(b) for b in self.bad[:5])
            raise BadRecordError(
                f"[{self.stage}] {len(self.bad)} of {self.total} records are bad "
                f"({self.fraction:.1%} > {self.settings}.max_bad_fraction={self.max_bad_fraction:.1%}); first:\n"
                f"  {first}"
            )


def _check_text(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} missing or not a string")
    if not value.strip():
        raise ValueError(f"empty {key!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _finite_numbers(value: Any, path: str) -> None:
    """ValueError naming the first non-finite or out-of-range number anywhere under ``value``."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path} is {value}: numbers in meta must be finite")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        raise ValueError(f"{path} is an integer of {len(str(abs(value)))} digits, outside the 64-bit range")
    if isinstance(value, dict):
        for key, item in value.items():
            _finite_numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _finite_numbers(item, f"{path}[{index}]")


def _attention_map(value: Any) -> bool:
    """``{"grids": [{"rows": r, "cols": c, "values": [r·c numbers]}, ...], ...}`` as selection writes it."""
    if not isinstance(value, dict):
        return False
    grids = value.get("grids", [])
    return isinstance(grids, list) and all(
        isinstance(g, dict) and all(isinstance(g.get(k), int) and g[k] >= 1 for k in ("rows", "cols"))
        and isinstance(g.get("values"), list) and len(g["values"]) == g["rows"] * g["cols"]
        and all(map(_is_number, g["values"])) for g in grids)


def check_meta(meta: dict[str, Any]) -> None:
    """The types of the ``meta`` fields miadpo reads (the pair record's contract) and finite numbers everywhere in
    it; ValueError naming the field."""
    _finite_numbers(meta, "meta")

    def whole(value: Any, least: int = 1) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    rules: dict[str, tuple[Callable[[Any], bool], str]] = {
        "format": (lambda v: isinstance(v, str), "a string or null"),
        "n_images": (whole, "a whole number ≥ 1 or null"),
        "target": (lambda v: whole(v) or (isinstance(v, list) and bool(v) and all(map(whole, v))),
                   "a whole number ≥ 1, a list of them, or null"),
        "attention_ratio": (_is_number, "a number or null"),
        "perplexity": (_is_number, "a number or null"),
        "image_scores": (lambda v: isinstance(v, list) and all(map(_is_number, v)), "a list of numbers or null"),
        "attention_maps": (lambda v: isinstance(v, list) and all(map(_attention_map, v)),
                           "a list of objects whose grids hold rows × cols numbers, or null"),
    }
    for key, (valid, expected) in rules.items():  # null stands for "not recorded" (selection writes it so)
        if meta.get(key) is not None and not valid(meta[key]):
            raise ValueError(f"meta.{key} must be {expected}, not {json.dumps(meta[key])[:80]}")


def parse_pair(obj: Any) -> PairRecord:
    """Build a PairRecord from one decoded JSON line (our format or the official release); ValueError if bad."""
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    if "id" not in obj:
        raise ValueError("field 'id' missing")
    images = obj.get("images", obj.get("image"))
    prompt = _check_text(obj, "prompt").replace(RELEASE_IMAGE_TOKEN, IMAGE_TOKEN)
    if isinstance(images, str) and "images" not in obj:  # the reference training code's single-image rule
        images, prompt = [images], IMAGE_TOKEN + "\n" + prompt.replace(IMAGE_TOKEN, "").strip()
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError("field 'images' (or 'image') missing or not a list of paths")
    chosen = _check_text(obj, "chosen")
    rejected = _check_text(obj, "rejected")
    for key, answer in (("chosen", chosen), ("rejected", rejected)):
        if (marker := image_marker_in(answer)) is not None:
            raise ValueError(f"image marker in an answer: {key!r} of record {str(obj['id'])!r} holds {marker!r}")
    n_tokens = prompt.count(IMAGE_TOKEN)
    if n_tokens != len(images):
        raise ValueError(f"image count mismatch: prompt has {n_tokens} {IMAGE_TOKEN} for {len(images)} images")
    if normalise_answer(chosen) == normalise_answer(rejected):
        raise ValueError("chosen and rejected are identical once case, punctuation, spaces and invisible characters "
                         "are ignored (normalise_answer, as selection compares answers)")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError("field 'meta' is not an object")
    check_meta(meta)
    negative = obj.get("rejected_images")
    if negative is not None:
        if not isinstance(negative, list) or not all(isinstance(p, str) and p for p in negative):
            raise ValueError("field 'rejected_images' is not a list of paths")
        if len(negative) != len(images):
            raise ValueError(f"rejected_images has {len(negative)} paths for {len(images)} images")
        if negative == images:
            raise ValueError("rejected_images are the pair's own images")
    return PairRecord(str(obj["id"]), images, prompt, chosen, rejected, meta, negative)


def load_record_images(roots: ImageRoots, paths: Sequence[str], options: ImageOptions | None, owner: str
                       ) -> list[Image.Image]:
    """The images of one record, by the image loader. They were checked when the record was read, so an image that
    fails now changed on disk since: ``BadRecordError`` naming ``owner`` (e.g. "pair <id>") and the reason."""
    try:
        return [load_record_image(roots, path, options) for path in paths]
    except ImageError as exc:
        raise BadRecordError(f"{owner}: {exc}") from exc


def pair_key(record: PairRecord, roots: ImageRoots) -> str:
    """A pair's content key (the reference cache's): prompt, answers and each image file's path, size, mtime —
    those of ``rejected_images`` too when the pair has them."""

    def files(paths: Sequence[str]) -> list[list[Any]]:
        out = []
        for path in paths:
            resolved = roots.resolve(path)
            stat = resolved.stat()
            out.append([str(resolved), stat.st_size, stat.st_mtime_ns])
        return out

    content: dict[str, Any] = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected,
                               "images": files(record.images)}
    if record.rejected_images is not None:
        content["rejected_images"] = files(record.rejected_images)
    return digest(content)


def read_pairs(
    path: str | Path,
    roots: ImageRoots,
    report: BadRecordReport,
    check_images: bool = True,
    image_options: ImageOptions | None = None,
) -> list[PairRecord]:
    """Read and validate a pair file (JSONL, or a JSON array as the official release ships). Bad records go to
    ``report`` (skip or raise per its policy)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pair file not found: {path}")
    records: list[PairRecord] = []
    seen: set[str] = set()
    for raw in iter_raw_records(path):
        report.total += 1
        obj = raw.value
        record_id = str(obj["id"]) if isinstance(obj, dict) and "id" in obj else None
        try:
            if raw.error is not None:
                raise ValueError(raw.error)
            record = parse_pair(obj)
            if record.id in seen:
                raise ValueError("duplicate id")
            for rel in [*record.images, *(record.rejected_images or ())]:
                if check_images:  # decoded by the one image loader: errors name the path and the root searched
                    check_record_image(roots, rel, image_options)
                else:
                    roots.resolve(rel)
        except ValueError as exc:
            report.add(BadRecord(str(path), raw.line, record_id, str(exc)))
            continue
        seen.add(record.id)
        records.append(record)
    if report.total == 0:
        raise BadRecordError(f"pair file {path} holds no records")
    report.finish()
    return records


def write_pairs(path: str | Path, records: Iterable[PairRecord]) -> int:
    """Write pairs as JSONL (atomically: a temporary file renamed into place). Returns the count."""
    count = 0
    with atomic_replace(Path(path)) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
            count += 1
    return count

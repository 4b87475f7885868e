"""Reading LLaVA-format single-image instruction data (``{id, image, conversations}``).

Accepts a JSON array (as LLaVA-665k ships) or JSONL (``miadpo.data.jsonl.iter_raw_records``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miadpo.config import AugmentConfig
from miadpo.data.jsonl import RawRecord, iter_raw_records
from miadpo.data.pairs import BadRecord, BadRecordReport, ImageRoots
from miadpo.text import IMAGE_TOKEN, RELEASE_IMAGE_TOKEN, image_marker_in


@dataclass(frozen=True)
class SourceRecord:
    """One usable single-image record of the LLaVA-format source."""

    index: int  # position in the source file, 0-based
    line: int  # line where the record starts, 1-based
    id: str
    image: str  # path under data.image_root
    source: str  # coco, gqa, ocr_vqa, textvqa, vg, ... or the source file's name (record_source)
    conversations: tuple[dict[str, str], ...]


def _conversations(value: Any, record_id: str) -> tuple[dict[str, str], ...]:
    """Alternating human/gpt turns. An answer (gpt turn) may hold no image marker; the questions together hold at
    most the record's one (the release's ``<image-placeholder>`` reads as ``<image>``; the formats place their own)."""
    if not isinstance(value, list) or len(value) < 2:
        raise ValueError("conversations missing or shorter than one question and one answer")
    turns = []
    for position, turn in enumerate(value):
        expected = "human" if position % 2 == 0 else "gpt"
        if not isinstance(turn, dict) or turn.get("from") != expected or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversation turn {position} is not a {expected!r} turn with a text value")
        if not turn["value"].strip():
            raise ValueError(f"conversation turn {position} is empty")
        text = turn["value"]
        if expected == "gpt" and (marker := image_marker_in(text)) is not None:
            raise ValueError(f"image marker in an answer: conversation turn {position} (gpt) of record "
                             f"{record_id!r} holds {marker!r}")
        turns.append({"from": expected, "value": text.replace(RELEASE_IMAGE_TOKEN, IMAGE_TOKEN)})
    markers = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if markers > 1:
        raise ValueError(f"image marker count: the questions of record {record_id!r} hold {markers} image markers "
                         "for its one image")
    return tuple(turns)


class Ineligible(Exception):
    """A well-formed record this stage does not use (counted, never an error)."""


def record_source(image: str, cfg: AugmentConfig, whole_file: str) -> str:
    """The source a record's companions are drawn from: ``data.augment.source_field`` when set; else the first folder
    of its image path when that folder is a known dataset (``data.augment.known_sources``: LLaVA-665k's coco, gqa,
    ocr_vqa, textvqa, vg) or, with no known sources listed, any first folder; else ``whole_file``: a flat, nested or
    COCO-style folder of one's own is one source, the whole source file."""
    folder, sep, _ = image.partition("/")
    if sep and (folder in cfg.known_sources or not cfg.known_sources):
        return folder
    return whole_file


def parse_source_record(raw: RawRecord, roots: ImageRoots, cfg: AugmentConfig, whole_file: str = "source"
                        ) -> SourceRecord:
    """Validate one raw record: ValueError if bad, :class:`Ineligible` if well-formed but unusable here; a record
    outside the known sources belongs to ``whole_file`` (``record_source``)."""
    if raw.error is not None:
        raise ValueError(raw.error)
    obj = raw.value
    if not isinstance(obj, dict):
        raise ValueError("record is not a JSON object")
    if "image" not in obj and cfg.skip_text_only:
        raise Ineligible("text-only (no image)")
    image = obj.get("image")
    if isinstance(image, list):
        raise Ineligible("already multi-image")
    if not isinstance(image, str) or not image.strip():
        raise ValueError("record without an image")
    if "id" not in obj:
        raise ValueError("field 'id' missing")
    conversations = _conversations(obj.get("conversations"), str(obj["id"]))
    if cfg.source_field:
        if cfg.source_field not in obj:
            raise ValueError(f"field {cfg.source_field!r} (data.augment.source_field) missing")
        source = str(obj[cfg.source_field])
    else:
        source = record_source(image, cfg, whole_file)
    if not roots.resolve(image).is_file():
        raise ValueError(f"image not found: {image}")
    return SourceRecord(raw.index, raw.line, str(obj["id"]), image, source, conversations)


def read_llava_source(path: str | Path, roots: ImageRoots, cfg: AugmentConfig, report: BadRecordReport
                      ) -> tuple[list[SourceRecord], Counter[str]]:
    """Eligible single-image records, plus counts of records set aside as ineligible (not bad).

    Bad records (broken JSON, bytes that are not UTF-8, malformed conversations, an image marker in an answer or
    more than one in the questions, missing image file) go to ``report``, which skips or raises per
    ``data.on_bad_record``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.source not found: {path}")
    records: list[SourceRecord] = []
    ineligible: Counter[str] = Counter()
    for raw in iter_raw_records(path):
        if cfg.max_records is not None and raw.index >= cfg.max_records:
            break
        try:
            record = parse_source_record(raw, roots, cfg, whole_file=path.stem)
        except Ineligible as reason:
            ineligible[str(reason)] += 1
            continue
        except ValueError as exc:
            report.total += 1
            record_id = str(raw.value["id"]) if isinstance(raw.value, dict) and "id" in raw.value else None
            report.add(BadRecord(str(path), raw.line, record_id, str(exc)))
            continue
        report.total += 1
        records.append(record)
    return records, ineligible

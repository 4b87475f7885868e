"""JSON(L) helpers shared by the stages: reading a JSON array or JSONL record by record, line-at-a-time appends
that survive a kill, and resume bookkeeping."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class RawRecord:
    index: int
    line: int
    value: Any = None
    error: str | None = None


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """Yield each top-level record of a JSON array or JSONL file with its line; decoding errors as records.

    A JSON array is decoded record by record, so a file cut short still yields every record before the cut, and
    the cut is reported with its line."""
    text = path.read_text(encoding="utf-8")
    start = len(text) - len(text.lstrip(_WHITESPACE))
    if text[start : start + 1] != "[":
        for index, (line_no, line) in enumerate((n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()):
            try:
                yield RawRecord(index, line_no, json.loads(line))
            except json.JSONDecodeError as exc:
                yield RawRecord(index, line_no, error=f"malformed JSON: {exc.msg}")
        return
    decoder = json.JSONDecoder()
    pos, line, index = start + 1, 1 + text.count("\n", 0, start + 1), 0
    while True:
        while pos < len(text) and text[pos] in _WHITESPACE + ",":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text):
            yield RawRecord(index, line, error="truncated JSON: the array is not closed")
            return
        if text[pos] == "]":
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            yield RawRecord(index, line, error=f"malformed or truncated JSON ({exc.msg}); the rest of the file "
                                              "cannot be read")
            return
        yield RawRecord(index, line, value)
        line += text.count("\n", pos, end)
        pos, index = end, index + 1


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def repair_tail(path: Path) -> None:
    """Drop a last line cut short by a crash (everything after the final newline)."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)


def completed_ids(*paths: Path) -> set[str]:
    """Ids already written to these files (each repaired first)."""
    done: set[str] = set()
    for path in paths:
        repair_tail(path)
        done.update(str(record["id"]) for record in read_jsonl(path))
    return done


def append_jsonl(handle: Any, records: Iterable[dict[str, Any]]) -> None:
    """Write records to an open text handle and flush, so a kill loses at most the line being written."""
    for record in records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()


@contextmanager
def atomic_replace(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path``, unique to this writer, renamed onto ``path`` when the block succeeds.

    Readers see the old file or the new one, never a part; concurrent writers of one file (two runs sharing a data
    directory) each rename a complete copy of their own instead of racing on one temporary name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)

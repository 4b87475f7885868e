"""JSON(L) helpers shared by the stages: reading a JSON array or JSONL record by record, line-at-a-time appends
that survive a kill, and resume bookkeeping."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_WHITESPACE = " \t\r\n"
_BOM = b"\xef\xbb\xbf"
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what ``errors="surrogateescape"`` makes of a byte that is not UTF-8


@dataclass(frozen=True)
class RawRecord:
    """One top-level record of a JSON array or JSONL file: its index, its line, its value and, when it is bad, the
    ``error``."""

    index: int
    line: int
    value: Any = None  # with ``error`` set: whatever could still be decoded (to name the id), never data
    error: str | None = None


class _ByteOffsets:
    """File byte offsets of positions in the decoded text, computed incrementally (positions asked in order)."""

    def __init__(self, text: str, base: int) -> None:
        self.text, self.pos, self.offset = text, 0, base

    def __call__(self, at: int) -> int:
        if at < self.pos:
            self.pos, self.offset = 0, self.offset - len(self.text[:self.pos].encode("utf-8", "surrogateescape"))
        self.offset += len(self.text[self.pos:at].encode("utf-8", "surrogateescape"))
        self.pos = at
        return self.offset


def _not_utf8(text: str, at: int, line: int, line_start: int, offset: int) -> str:
    """The reason for the undecodable byte at ``text[at]`` (a surrogate escape): its value, line, column and file
    byte offset (``offset``); ``line_start`` is the index in ``text`` where ``line`` begins."""
    byte = ord(text[at]) - 0xDC00
    column = len(text[line_start:at].encode("utf-8", "surrogateescape")) + 1
    return f"not UTF-8: byte 0x{byte:02x} at line {line}, column {column} (byte offset {offset})"


def iter_raw_records(path: Path) -> Iterator[RawRecord]:
    """Yield each top-level record of a JSON array or JSONL file with its line; decoding errors as records.

    A JSON array is decoded record by record, so a file cut short still yields every record before the cut, and
    the cut is reported with its line. Bytes that are not UTF-8 make their line (JSONL) or record (array) a bad
    record naming the byte and its offset; the rest of the file still reads. A UTF-8 byte-order mark is ignored.
    JSONL lines end at ``\\n`` only: U+2028 and the like inside a string (as ``ensure_ascii=False`` writes them)
    stay part of their record."""
    with path.open("rb") as handle:
        head = handle.read(len(_BOM))
        bom = len(_BOM) if head == _BOM else 0
        handle.seek(bom)
        first = handle.read(4096)
        while first and not first.lstrip(_WHITESPACE.encode()):
            more = handle.read(4096)
            if not more:
                break
            first += more
        is_array = first.lstrip(_WHITESPACE.encode())[:1] == b"["
        handle.seek(bom)
        if not is_array:
            yield from _iter_jsonl(handle, bom)
            return
        text = handle.read().decode("utf-8", "surrogateescape")
    yield from _iter_array(text, bom)


def _number_error(exc: ValueError) -> str:
    """Python's refusal of an over-long integer, said plainly."""
    digits = re.search(r"value has (\d+) digits", str(exc))
    return f"a number of {digits.group(1)} digits" if digits else str(exc)


def _iter_jsonl(handle: Any, offset: int) -> Iterator[RawRecord]:
    index = 0
    for line_no, data in enumerate(handle, 1):
        start, offset = offset, offset + len(data)
        if not data.strip():
            continue
        text = data.decode("utf-8", "surrogateescape")
        error = None
        bad = _NOT_UTF8.search(text)
        if bad is not None:
            error = _not_utf8(text, bad.start(), line_no, 0,
                              start + len(text[:bad.start()].encode("utf-8", "surrogateescape")))
        try:
            value = json.loads(text if bad is None else _NOT_UTF8.sub("\ufffd", text))
        except json.JSONDecodeError as exc:
            value, error = None, error or f"malformed JSON: {exc.msg}"
        except ValueError as exc:  # an integer longer than Python converts (4,300 digits)
            value, error = None, error or f"malformed JSON: {_number_error(exc)}"
        yield RawRecord(index, line_no, value, error)
        index += 1


def _iter_array(text: str, byte_base: int) -> Iterator[RawRecord]:
    start = len(text) - len(text.lstrip(_WHITESPACE))
    decoder, byte_offset = json.JSONDecoder(), _ByteOffsets(text, byte_base)
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
            bad = _NOT_UTF8.search(text, pos, exc.pos + 1)
            cause = exc.msg if bad is None else _not_utf8_in(text, bad.start(), line, pos, byte_offset)
            yield RawRecord(index, line, error=f"malformed or truncated JSON ({cause}); the rest of the file "
                                              "cannot be read")
            return
        except ValueError as exc:  # an integer longer than Python converts: where it ends is unknown
            yield RawRecord(index, line, error=f"malformed JSON ({_number_error(exc)}); the rest of the file "
                                              "cannot be read")
            return
        bad = _NOT_UTF8.search(text, pos, end)
        if bad is None:
            yield RawRecord(index, line, value)
        else:  # the value is kept (bad bytes as U+FFFD) only to name the record
            yield RawRecord(index, line, json.loads(_NOT_UTF8.sub("\ufffd", text[pos:end])),
                            _not_utf8_in(text, bad.start(), line, pos, byte_offset))
        line += text.count("\n", pos, end)
        pos, index = end, index + 1


def _not_utf8_in(text: str, at: int, line: int, pos: int, byte_offset: _ByteOffsets) -> str:
    """:func:`_not_utf8` for a byte inside the record that starts at ``text[pos]`` on ``line``."""
    line_start = text.rfind("\n", 0, at) + 1
    return _not_utf8(text, at, line + text.count("\n", pos, at), line_start, byte_offset(at))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file, one per non-blank line; an empty list when the file does not exist."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def refuse_symlink(path: Path) -> None:
    """ValueError if ``path`` (a file a stage appends to or repairs in its own output) is a symbolic link: a stage
    never writes through a link, which could truncate or fill a file outside its directory."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link (to {os.readlink(path)}): a stage writes its own output files "
                         "and never through a link; remove the link (the stage rewrites what it needs)")


def repair_tail(path: Path) -> None:
    """Drop a last line cut short by a crash (everything after the final newline); refuses a symbolic link."""
    refuse_symlink(path)
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

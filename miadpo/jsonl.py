"""JSONL helpers shared by the stages: line-at-a-time appends that survive a kill, and resume bookkeeping."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


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

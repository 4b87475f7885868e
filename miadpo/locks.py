"""One writer per stage directory: an exclusive, non-waiting lock file beside what a stage writes.

A stage that is about to write (augmentation output, selection candidates, a reference-cache shard) takes
``stage_lock(<dir>/<name>.lock)``; a second, independent run that wants to write the same directory fails at once
with a message naming the holder (pid, host, start time, command), instead of writing every record a second
time. Readers of a finished stage take no lock. The lock is ``fcntl.flock`` on an open file: the kernel drops
it when its holder exits or is killed, so a lock file left behind by a dead run never blocks (its text is only
a stale description). On systems without ``fcntl`` the lock is a no-op.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not Linux/macOS
    fcntl = None  # type: ignore[assignment]


class StageLocked(RuntimeError):
    """Another process is writing the stage directory."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


def _holder_info() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join([sys.executable, *sys.argv])}


def read_holder(path: Path) -> dict[str, Any] | None:
    """What the lock file says about its holder (None when empty or unreadable)."""
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def describe(holder: dict[str, Any] | None) -> str:
    """The lock holder as a message names it: pid, host, start time and command."""
    if not holder:
        return "another process (it has not written its details yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, "
            f"command: {holder.get('command')}")


@contextmanager
def stage_lock(path: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``path`` for the block, or raise :class:`StageLocked` at once if it is held."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(path)
            raise StageLocked(
                f"{what} {path.parent} is being written by another run: {describe(holder)}. Wait for it to finish "
                f"(a finished stage is then read, not rewritten) or use another data.out_dir. Lock file: {path}",
                holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_info()) + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released: no holder to name
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)

"""``python tests/interrupt.py MODULE FILE N [ARGS...]``: ``python -m MODULE ARGS...``, ended right after the
N-th JSONL line appended to a file named FILE, as a kill would end it (``os._exit``: no cleanup, no ``finally``,
no flush beyond the one each append does), with the exit status ``INTERRUPTED``.

A deterministic interruption point for the "killed half-way, then resumed" tests: the stages append their output
with ``miadpo.data.jsonl.append_jsonl``, patched here before the stage's modules import it."""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Iterable
from typing import Any

INTERRUPTED = 86


def interrupted_command(module: str, name: str, after: int) -> list[str]:
    """The command line (before the module's own arguments) of ``python -m module``, interrupted after ``after``
    lines appended to the file ``name``."""
    return [sys.executable, os.path.abspath(__file__), module, name, str(after)]


def main() -> None:
    module, name, limit, *args = sys.argv[1:]
    del sys.path[0]  # this folder: the stage runs as ``python -m`` would run it
    import miadpo.data.jsonl as jsonl

    append = jsonl.append_jsonl
    written = 0

    def append_then_stop(handle: Any, records: Iterable[dict[str, Any]]) -> None:
        nonlocal written
        records = list(records)
        append(handle, records)
        if os.path.basename(str(getattr(handle, "name", ""))) == name:
            written += len(records)
            if written >= int(limit):
                os._exit(INTERRUPTED)

    jsonl.append_jsonl = append_then_stop
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""What identifies a model's weights, for the caches keyed by them (selection candidates, reference log-probs).

A weights directory is identified by the **content** of its files (SHA-256 of every file, by relative name), so
a policy merged from a LoRA round — same file names, same sizes — never hits the base's caches. Hashing a 7B
checkpoint takes seconds; digests are memoised per process by (path, size, mtime, ctime, inode), so a file
rewritten in place (even with its size and modification time kept) is hashed again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from miadpo.config import ModelConfig

_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised while the file's stat signature stays the same."""
    stat = path.stat()
    signature = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)
    if signature not in _DIGESTS:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        _DIGESTS[signature] = digest.hexdigest()
    return _DIGESTS[signature]


def weights_identity(cfg: ModelConfig) -> dict[str, Any]:
    """The in-code recipe (a model built from ``model.tiny``), the files' content, or the hub id."""
    if cfg.path is None:
        return {"built_in_code": dict(cfg.tiny)}
    path = Path(cfg.path)
    if not path.is_dir():
        return {"hub": cfg.path}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    return {"files": [[os.fspath(p.relative_to(path)), p.stat().st_size, file_sha256(p)] for p in files]}

"""Fingerprints of everything the caches are keyed by: weights, files and settings, and every cache key's digest
(one module for augmentation, selection, the reference cache, rounds and the synthetic data; every key it computes
is the one earlier versions computed, so users' caches stay valid — ``tests/test_fingerprint.py`` and
``tests/test_default_run_pins.py`` pin them).

``digest(value, algorithm, length)``: a JSON value's hash (sort_keys). Each stage's key is one function below
(``augmentation_key``, ``selection_key``, ``reference_key``, ``round_key``, ``synthetic_key``) over the identity
the stage composes beside its cache (what its output depends on); ``miadpo.data.stage_cache`` makes the directory.
``file_sha1``: a source or records file's content. ``weights_identity``: a model's weights, as below.

A weights directory is identified by the **content** of its files (SHA-256 of every file, by relative name), so
a policy merged from a LoRA round — same file names, same sizes — never hits the base's caches. A model built in
code (``model.path`` null) is identified by its recipe and the SHA-256 of its state dict, so weights changed in
memory are another model; a hub model by its id and the commit it was loaded from.

Hashing a 7B checkpoint takes seconds, so digests are memoised per process by the file's (path, device, inode,
size, mtime, ctime). A rewrite can keep all of these when it lands within one timestamp tick of the hash (or on
a filesystem with coarse timestamps), so a digest is memoised only for files of at least ``MEMO_MIN_BYTES`` whose
last change is more than ``MEMO_MIN_AGE_NS`` old (any later change then moves the ctime); others are hashed
every time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from miadpo.config import ModelConfig

MEMO_MIN_BYTES = 1 << 20
MEMO_MIN_AGE_NS = 2_000_000_000
_DIGESTS: dict[tuple[Any, ...], str] = {}


def digest(value: Any, algorithm: str = "sha256", length: int = 24) -> str:
    """Hex digest (first ``length`` characters) of ``value`` as sorted-key JSON (non-JSON values by ``str``)."""
    text = json.dumps(value, sort_keys=True, default=str).encode()
    return hashlib.new(algorithm, text).hexdigest()[:length]


def augmentation_key(inputs: Any) -> str:
    """The augmentation's fingerprint (in its manifest; ``miadpo.augment.runner.fingerprint``): SHA-1[:16]."""
    return digest(inputs, "sha1", 16)


def selection_key(identity: Any) -> str:
    """A selection directory's name (candidates, and the pairs of a rule set): SHA-1[:16]."""
    return digest(identity, "sha1", 16)


def reference_key(identity: Any) -> str:
    """The reference cache's model directory (``miadpo.dpo.reference_cache.model_key``): SHA-256[:24]."""
    return digest(identity)


def round_key(config: Any) -> str:
    """A finished on-policy round's fingerprint (its whole resolved config): SHA-256[:24]."""
    return digest(config)


def synthetic_key(settings: Any) -> str:
    """The synthetic pairs' directory (their settings): SHA-1[:10]."""
    return digest(settings, "sha1", 10)


def file_sha1(path: Path) -> str:
    """SHA-1 of a file's bytes (augmentation sources, augmented records)."""
    sha = hashlib.sha1()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _signature(path: Path, stat: Any) -> tuple[Any, ...]:
    return (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, memoised while the file's stat signature stays the same (see the module doc)."""
    before = path.stat()
    signature = _signature(path, before)
    if signature in _DIGESTS:
        return _DIGESTS[signature]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    after = path.stat()
    settled = time.time_ns() - max(after.st_mtime_ns, after.st_ctime_ns) > MEMO_MIN_AGE_NS
    if before.st_size >= MEMO_MIN_BYTES and settled and _signature(path, after) == signature:
        _DIGESTS[signature] = digest.hexdigest()
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict: every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weights_identity(cfg: ModelConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """The files' content; for a model built in code its recipe and (given ``model``) its state dict; for a hub
    id the id and (given ``model``) the commit transformers loaded."""
    if cfg.path is None:
        identity: dict[str, Any] = {"built_in_code": dict(cfg.tiny)}
        if model is not None:
            identity["state_sha256"] = state_dict_sha256(model)
        return identity
    path = Path(cfg.path)
    if not path.is_dir():
        commit = getattr(getattr(model, "config", None), "_commit_hash", None)
        return {"hub": cfg.path, **({"commit": commit} if commit else {})}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    return {"files": [[os.fspath(p.relative_to(path)), p.stat().st_size, file_sha256(p)] for p in files]}

"""Reference log-probs computed once per pair and kept on disk.

The reference model never changes during DPO, so its answer log-probs are a function of the pair and of the
reference itself. They are computed in one pass before training (only for pairs not yet cached) and stored in
``<dpo.fast.reference_cache_dir>/<model key>/logps.<rank>.jsonl``. The model key hashes the base weights'
content, the adapter family, the chat template, the image preprocessing and the length policy; the pair key
hashes the prompt, both answers and each image file's path, size and modification time. Runs and sweeps that
share pairs and base model (β, loss, SFT weight, learning rate may differ) reuse them; training with the cache
never builds or runs the reference.

Each rank appends to its own shard only while holding that shard's lock (``logps.<rank>.lock``, see
:mod:`miadpo.locks`): a second run filling the same shard fails at once naming the holder. A run whose pairs are
all cached only reads, without the lock, and ignores a last line another run is still writing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from miadpo.config import DataConfig
from miadpo.data.jsonl import append_jsonl, repair_tail
from miadpo.dpo.forward import PairForward
from miadpo.fingerprint import digest, weights_identity
from miadpo.locks import stage_lock
from miadpo.models.base import ModelAdapter

log = logging.getLogger(__name__)


def model_key(adapter: ModelAdapter, data: DataConfig) -> str:
    """What the reference log-probs depend on besides the pair."""
    processor = adapter.image_processor
    return digest({
        "weights": weights_identity(adapter.cfg, adapter.model), "family": adapter.cfg.family,
        "dtype": adapter.cfg.dtype,
        "template": adapter.template, "pad_to_square": adapter.cfg.pad_to_square,
        "image_processor": processor.to_dict() if hasattr(processor, "to_dict") else repr(processor),
        "max_length": data.max_length, "on_too_long": str(data.on_too_long),
    })


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a shard, without a last line cut short (a crash, or another run writing it right now)."""
    data = path.read_bytes()
    return [json.loads(line) for line in data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines() if line.strip()]


class ReferenceCache:
    """Reference log-probs by pair key: ``[chosen, rejected, chosen_tokens, rejected_tokens]``."""

    def __init__(self, directory: str | Path, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / f"logps.{rank}.jsonl"
        self.lock_path = self.directory / f"logps.{rank}.lock"
        self.values: dict[str, list[float]] = {}
        self._writing = False
        self.reload()

    def reload(self) -> None:
        for file in sorted(self.directory.glob("logps.*.jsonl")):
            for row in _complete_rows(file):
                self.values[row["key"]] = row["logps"]

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold this rank's shard for appending (fails at once if another run holds it)."""
        with stage_lock(self.lock_path, "the reference cache"):
            repair_tail(self.path)  # a run killed mid-write leaves at most one broken last line
            self.reload()  # rows the previous holder added since this cache was read
            self._writing = True
            try:
                yield
            finally:
                self._writing = False

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def __getitem__(self, key: str) -> list[float]:
        return self.values[key]

    def add(self, rows: Sequence[tuple[str, list[float]]]) -> None:
        if not self._writing:
            raise RuntimeError("ReferenceCache.add outside ReferenceCache.writing()")
        for key, values in rows:
            self.values[key] = values
        with self.path.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, [{"key": key, "logps": values} for key, values in rows])


@torch.no_grad()
def fill_reference_cache(cache: ReferenceCache, datasets: Sequence[Any], reference: torch.nn.Module,
                         forward: PairForward, batch_size: int) -> int:
    """Compute and store the reference log-probs of every pair not yet cached (batches: ``forward.collate``);
    returns how many were computed."""
    was_training = reference.training
    reference.eval()
    # The pass must not consume the global RNG (data loader seeds), so that LoRA initialisation and data order
    # after it are those of a run without the cache.
    try:
        with torch.random.fork_rng(devices=[]):
            computed = _fill(cache, datasets, reference, forward, batch_size)
    finally:
        reference.train(was_training)
    log.info("reference log-probs: %d computed, %d cached in %s", computed, len(cache.values) - computed,
             cache.directory)
    return computed


def _fill(cache: ReferenceCache, datasets: Sequence[Any], reference: torch.nn.Module, forward: PairForward,
          batch_size: int) -> int:
    if all(key in cache for dataset in datasets for key in dataset.keys):
        return 0  # everything cached: read only, no lock
    with cache.writing():
        return _fill_missing(cache, datasets, reference, forward, batch_size)


def _fill_missing(cache: ReferenceCache, datasets: Sequence[Any], reference: torch.nn.Module,
                  forward: PairForward, batch_size: int) -> int:
    computed = 0
    for dataset in datasets:
        missing = [i for i, key in enumerate(dataset.keys) if key not in cache]
        if not missing:
            continue
        loader = DataLoader(Subset(dataset, missing), batch_size=batch_size, collate_fn=forward.collate)
        for batch in loader:
            logps = forward(reference, batch)
            rows = zip(logps.chosen.tolist(), logps.rejected.tolist(), logps.chosen_tokens.tolist(),
                       logps.rejected_tokens.tolist())
            cache.add([(key, list(row)) for key, row in zip(batch.keys, rows)])
            computed += batch.num_pairs
    return computed

"""Reference log-probs computed once per pair and kept on disk.

The reference model never changes during DPO, so its answer log-probs are a function of the pair and of the
reference itself. They are stored in ``<dpo.fast.reference_cache_dir>/<model key>/logps.<rank>.jsonl``. The model
key hashes the base weights' content, the adapter family, the chat template, the image preprocessing and the length
policy; the pair key hashes the prompt, both answers and each image file's path, size and modification time (of the
pair's ``rejected_images`` too). A row holds ``[chosen, rejected, chosen_tokens, rejected_tokens]`` and, once a run
with the conditional term (``dpo.conditional_weight``) computed it, the chosen answer's log-prob against the negative
images as a fifth value: a pair trained with its negative is cached only by a five-value row (a four-value one is a
miss, recomputed and appended; the longer row of a key wins). Runs
and sweeps that share pairs and base model (β, loss, SFT weight, learning rate may differ) reuse them; a run whose
pairs are all cached never builds or runs the reference.

Two ways to fill it (``dpo.fast.reference_prepass``):

- **in the step** (``InStepFilling``, the default with LoRA): the first time a pair is trained its reference
  log-probs are computed in the training step, where the reference shares the prompt pass' image features, and
  appended to the cache; later epochs, resumed runs and sweep jobs read them. Each process of a multi-process run
  writes the pairs of its own batches to its own shard, so each pair is computed once across processes.
- **a pre-pass** (``fill_reference_cache``, the default for full fine-tuning and for ``dpo.reference_path``): every
  pair not yet cached, before training, so that no reference model is held during training. Processes started
  together (torchrun, srun: ``RANK`` / ``WORLD_SIZE``) each compute the pairs of their hash share and wait for the
  others' shards.

Each process appends to its shard only while holding that shard's lock (``logps.<rank>.lock``, see
:mod:`miadpo.locks`): a second pre-pass filling the same shard fails at once naming the holder; a training run that
finds the shard held computes its reference in the step without writing it. Appends are flushed per batch, so a
killed run loses at most the batch in flight. A run whose pairs are all cached only reads, without the lock, and
ignores a last line another run is still writing.
"""

from __future__ import annotations

import json
import logging
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from miadpo.config import DataConfig
from miadpo.data.jsonl import append_jsonl, repair_tail
from miadpo.data.stage_cache import StageCache
from miadpo.dpo.batch import PairLogps, negative_needs, reference_rows
from miadpo.dpo.forward import PairForward
from miadpo.fingerprint import reference_key, weights_identity
from miadpo.locks import StageLocked
from miadpo.models.base import ModelAdapter

log = logging.getLogger(__name__)


def model_key(adapter: ModelAdapter, data: DataConfig) -> str:
    """What the reference log-probs depend on besides the pair."""
    processor = adapter.image_processor
    return reference_key({
        "weights": weights_identity(adapter.cfg, adapter.model), "family": adapter.cfg.family,
        "dtype": adapter.cfg.dtype,
        "template": adapter.template, "pad_to_square": adapter.cfg.pad_to_square,
        "image_processor": processor.to_dict() if hasattr(processor, "to_dict") else repr(processor),
        "max_length": adapter.token_budget(data.max_length), "on_too_long": str(data.on_too_long),
    })


def _complete_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a shard, without a last line cut short (a crash, or another run writing it right now). A line
    that is not a row (torn in the middle of the file, not JSON, values missing or not finite) is dropped with a
    warning naming the file and line: its pair is not cached, so its reference log-probs are computed again."""
    data = path.read_bytes()
    rows = []
    for number, line in enumerate(data[: data.rfind(b"\n") + 1].split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            problem = _row_problem(row)
        except (UnicodeDecodeError, ValueError) as exc:
            problem = f"not a JSON row ({exc})"
        if problem:
            log.warning("reference cache %s:%d: %s; dropped (its reference log-probs are computed again)", path,
                        number, problem)
            continue
        rows.append(row)
    return rows


def _row_problem(row: Any) -> str | None:
    """Why a decoded line is not a cache row (``{"key": str, "logps": [4 or 5 finite numbers]}``), or None."""
    if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not isinstance(row.get("logps"), list):
        return "not a {key, logps} row"
    values = row["logps"]
    if len(values) not in (4, 5) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return f"logps is not 4 or 5 numbers: {json.dumps(values)[:80]}"
    if not all(math.isfinite(v) for v in values):
        return f"a log-prob is not finite: {json.dumps(values)[:80]}"
    return None


class ReferenceCache:
    """Reference log-probs by pair key: ``[chosen, rejected, chosen_tokens, rejected_tokens]``."""

    def __init__(self, directory: str | Path, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.stage = StageCache(self.directory, what="the reference cache")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.values: dict[str, list[float]] = {}
        self._writing = False
        self.use_shard(rank)
        self.reload()

    def use_shard(self, rank: int) -> None:
        """Append to ``logps.<rank>.jsonl`` (each process of a multi-process run writes its own)."""
        if self._writing:
            raise RuntimeError("ReferenceCache.use_shard while writing")
        self.path = self.directory / f"logps.{rank}.jsonl"
        self.lock_name = f"logps.{rank}.lock"

    def reload(self) -> None:
        """Read every shard of the directory again (a key's longer row wins)."""
        for file in self.stage.shards("logps.*.jsonl"):
            for row in _complete_rows(file):
                self._keep(row["key"], row["logps"])

    def _keep(self, key: str, values: list[float]) -> None:
        """A key's row; a row with the negative's log-prob is never replaced by one without."""
        if len(values) >= len(self.values.get(key, ())):
            self.values[key] = values

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold this rank's shard for appending (fails at once if another run holds it)."""
        with self.stage.writing(self.lock_name):
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

    def row(self, key: str, with_negative: bool = False) -> list[float] | None:
        """The pair's cached row; None when it is not cached, or ``with_negative`` and the row lacks the negative."""
        values = self.values.get(key)
        if values is None or (with_negative and len(values) < 5):
            return None
        return values

    def covers(self, keys: Iterator[str] | Sequence[str], with_negative: Sequence[bool] | None = None) -> bool:
        """Whether every key is cached (with its negative's log-prob where ``with_negative``)."""
        keys = list(keys)
        needs = with_negative if with_negative is not None else [False] * len(keys)
        return all(self.row(key, need) is not None for key, need in zip(keys, needs))

    def lookup(self, keys: Sequence[str], device: torch.device | str = "cpu",
               has_negative: torch.Tensor | None = None) -> PairLogps | None:
        """The cached reference log-probs of a batch's pairs, or None unless every one is cached (the pairs marked
        by ``has_negative`` with their negative's log-prob)."""
        if not self.covers(keys, negative_needs(has_negative, len(keys))):
            return None
        rows = reference_rows([self.values[key] for key in keys], 4 if has_negative is None else 5, device)
        return PairLogps.from_rows(rows, None if has_negative is None else has_negative.to(device))

    def add(self, rows: Sequence[tuple[str, list[float]]]) -> None:
        """Keep ``rows`` and append them to this rank's shard (only inside ``writing``)."""
        if not self._writing:
            raise RuntimeError("ReferenceCache.add outside ReferenceCache.writing()")
        for key, values in rows:
            self._keep(key, values)
        with self.path.open("a", encoding="utf-8") as handle:
            append_jsonl(handle, [{"key": key, "logps": values} for key, values in rows])


def logps_rows(keys: Sequence[str], logps: PairLogps) -> list[tuple[str, list[float]]]:
    """Cache rows ``(key, [chosen, rejected, chosen_tokens, rejected_tokens])`` of a batch's log-probs, with the
    negative's log-prob fifth for the pairs that have one."""
    rows = logps.rows().tolist()
    if logps.has_negative is None:
        return list(zip(keys, rows))
    return [(key, row if has else row[:4]) for key, row, has in zip(keys, rows, logps.has_negative.tolist())]


def dataset_needs(dataset: Any) -> list[tuple[str, bool]]:
    """(key, trained with its negative) of every pair of a dataset with cache keys (a ``PairDataset`` with a cache
    attached; a dataset without ``has_negative`` has no negatives)."""
    has_negative = getattr(dataset, "has_negative", lambda index: False)
    return [(key, bool(has_negative(i))) for i, key in enumerate(dataset.keys)]


class InStepFilling(L.Callback):
    """Appends the reference log-probs a training step computed to the cache, for the pairs it does not hold yet.

    As a callback of the run (``DPOModule.configure_callbacks``) it writes this process' shard and closes it when
    the run ends or fails. The shard's lock is taken at the first write and held until ``close``; if another run
    holds it, this run goes on computing its reference in the step without writing (logged once)."""

    def __init__(self, cache: ReferenceCache) -> None:
        self.cache = cache
        self.written = 0
        self._stack: ExitStack | None = None
        self._refused = False

    def record(self, keys: Sequence[str], logps: PairLogps) -> None:
        """Appends the rows of ``keys`` the cache lacks, taking the shard's lock at the first write (nothing is
        written if another run holds it)."""
        needs = negative_needs(logps.has_negative, len(keys))
        if self._refused or self.cache.covers(keys, needs):
            return
        if self._stack is None:
            stack = ExitStack()
            try:
                stack.enter_context(self.cache.writing())
            except StageLocked as exc:
                self._refused = True
                log.warning("reference log-probs are computed in the step but not cached by this run: %s", exc)
                return
            self._stack = stack
        rows = dict(row for row, need in zip(logps_rows(keys, logps), needs)
                    if self.cache.row(row[0], need) is None)  # a pair twice in the batch: once
        if rows:
            self.cache.add(list(rows.items()))
            self.written += len(rows)

    def close(self) -> None:
        """Releases the shard's lock, if held, and logs how many pairs this run cached."""
        if self._stack is not None:
            self._stack.close()
            self._stack = None
            log.info("reference log-probs: %d computed in the step and cached in %s", self.written,
                     self.cache.directory)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Points the cache at this process' shard (``logps.<rank>.jsonl``)."""
        self.cache.use_shard(trainer.global_rank)  # each process appends to its own shard

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Closes the shard (``close``)."""
        self.close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Closes the shard (``close``)."""
        self.close()  # what was appended stays; the lock is released for a resumed run in this process


def shard_of(key: str, world: int) -> int:
    """The process of a ``world``-process pre-pass that computes ``key`` (a stable hash share)."""
    return zlib.crc32(key.encode()) % world


@torch.no_grad()
def fill_reference_cache(cache: ReferenceCache, datasets: Sequence[Any], reference: torch.nn.Module,
                         forward: PairForward, batch_size: int, rank: int = 0, world: int = 1,
                         wait_s: float = 3600.0) -> int:
    """Compute and store the reference log-probs of every pair not yet cached (batches: ``forward.collate``);
    returns how many this process computed. With ``world`` > 1 processes started together, this one (``rank``)
    computes the pairs of its share (``shard_of``) and then waits up to ``wait_s`` seconds for the others' shards."""
    was_training = reference.training
    reference.eval()
    # The pass must not consume the global RNG (data loader seeds), so that LoRA initialisation and data order
    # after it are those of a run without the cache.
    try:
        with torch.random.fork_rng(devices=[]):
            computed = _fill(cache, datasets, reference, forward, batch_size, rank, world)
    finally:
        reference.train(was_training)
    if world > 1:
        _wait_for_shards(cache, datasets, wait_s)
    log.info("reference log-probs: %d computed, %d cached in %s", computed, len(cache.values) - computed,
             cache.directory)
    return computed


def _fill(cache: ReferenceCache, datasets: Sequence[Any], reference: torch.nn.Module, forward: PairForward,
          batch_size: int, rank: int, world: int) -> int:
    def mine(dataset: Any) -> list[int]:
        return [i for i, (key, need) in enumerate(dataset_needs(dataset))
                if cache.row(key, need) is None and shard_of(key, world) == rank]

    if not any(mine(dataset) for dataset in datasets):
        return 0  # everything (of this share) cached: read only, no lock
    computed = 0
    with cache.writing():
        for dataset in datasets:
            indices = mine(dataset)  # after the lock's reload
            if not indices:
                continue
            loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, collate_fn=forward.collate)
            for batch in loader:
                cache.add(logps_rows(batch.keys, forward(reference, batch)))
                computed += batch.num_pairs
    return computed


def _wait_for_shards(cache: ReferenceCache, datasets: Sequence[Any], wait_s: float) -> None:
    """Until every pair is cached (the other processes' shards complete), reading the shards again each second."""
    deadline = time.monotonic() + wait_s
    needs = [pair for dataset in datasets for pair in dataset_needs(dataset)]
    keys, with_negative = [key for key, _ in needs], [need for _, need in needs]
    while not cache.covers(keys, with_negative):
        if time.monotonic() > deadline:
            missing = sum(cache.row(key, need) is None for key, need in needs)
            raise TimeoutError(f"reference pre-pass: {missing} pairs still missing from the other processes' shards "
                               f"in {cache.directory} after {wait_s:.0f} s (did every rank start?)")
        time.sleep(1.0)
        cache.reload()

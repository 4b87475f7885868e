"""Pairs → encoded pairs: validated loading, the truncation guard, the train/val split and the DataModule.

The DataModule batches with the collate function it is given (the DPO pair forward's own, ``miadpo.dpo.forward``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from miadpo.config import DataConfig, DataPreparation, TooLongPolicy
from miadpo.data.images import ImageOptions, record_image_size
from miadpo.data.jsonl import iter_raw_records
from miadpo.data.pairs import (
    BadRecord,
    BadRecordError,
    BadRecordReport,
    ImageRoots,
    PairRecord,
    load_record_images,
    pair_key,
    read_pairs,
)
from miadpo.models.base import ModelAdapter
from miadpo.models.samples import EncodedSample

log = logging.getLogger(__name__)


@dataclass
class LengthGuardResult:
    """What ``apply_length_guard`` decided: the pairs kept (``truncated``: those whose answer will be cut), skipped and
    bad, and those whose image-side negative was dropped."""

    kept: list[PairRecord]
    truncated: list[str]  # ids whose longer answer will be cut to fit
    skipped: list[tuple[str, str]]  # (id, reason)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (id, reason): an image that cannot be opened
    negatives_dropped: list[str] = field(default_factory=list)  # ids trained without their image-side negative


def apply_length_guard(records: Sequence[PairRecord], roots: ImageRoots, adapter: ModelAdapter,
                       max_length: int, policy: TooLongPolicy, images: ImageOptions | None = None,
                       image_negatives: bool = False) -> LengthGuardResult:
    """Decide, from token counts alone, which pairs fit ``max_length``.

    Image tokens are never cut: a pair whose prompt (with its images) does not fit is skipped; one whose
    answer overflows is truncated on the answer side (``truncate_answer``) or skipped (``skip``). Sizes are those
    the loader gives (upright, capped: ``miadpo.data.images``); a pair with an image that cannot be opened (or is too
    large under ``on_large_image=skip``) goes to ``bad``. With ``image_negatives``, a pair whose chosen answer does not
    fit whole after its prompt with either the images or the negative ones (other image sizes can mean other image
    tokens) keeps its text pair only (``negatives_dropped``), so both terms score the same whole answer.
    """
    result = LengthGuardResult([], [], [])
    for record in records:
        try:
            sizes = [record_image_size(roots, rel, images) for rel in record.images]
        except ValueError as exc:  # ImageError, or a path refused by ImageRoots
            result.bad.append((record.id, str(exc)))
            continue
        prompt_len, chosen_len = adapter.count_tokens(record.prompt, record.chosen, sizes)
        if image_negatives and record.rejected_images is not None:
            try:
                negative_sizes = [record_image_size(roots, rel, images) for rel in record.rejected_images]
            except ValueError as exc:
                result.bad.append((record.id, f"rejected_images: {exc}"))
                continue
            negative_len = sum(adapter.count_tokens(record.prompt, record.chosen, negative_sizes))
            if max(negative_len, prompt_len + chosen_len) > max_length:  # the same whole answer, or none
                record = replace(record, rejected_images=None)
                result.negatives_dropped.append(record.id)
        _, rejected_len = adapter.count_tokens(record.prompt, record.rejected, sizes)
        total = prompt_len + max(chosen_len, rejected_len)
        if total <= max_length:
            result.kept.append(record)
        elif prompt_len >= max_length:
            result.skipped.append((record.id, f"prompt with images is {prompt_len} tokens >= {max_length}"))
        elif TooLongPolicy(policy) is TooLongPolicy.truncate_answer:
            result.kept.append(record)
            result.truncated.append(record.id)
        else:
            result.skipped.append((record.id, f"{total} tokens > data.max_length={max_length}"))
    return result


def split_train_val(records: Sequence[PairRecord], val_fraction: float, seed: int
                    ) -> tuple[list[PairRecord], list[PairRecord]]:
    """Deterministic split by a seeded hash of each id (stable under reordering of the file)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = math.ceil(val_fraction * len(records)) if len(records) > 1 else 0

    def key(record: PairRecord) -> str:
        return hashlib.sha1(f"{seed}:{record.id}".encode()).hexdigest()

    ordered = sorted(records, key=key)
    val_ids = {r.id for r in ordered[:n_val]}
    return [r for r in records if r.id not in val_ids], [r for r in records if r.id in val_ids]


@dataclass
class EncodedPair:
    """One pair ready to collate: chosen and rejected encoded against the same processed images; with image-side
    negatives on, ``negative`` is the chosen answer encoded against the pair's ``rejected_images``."""

    id: str
    chosen: EncodedSample
    rejected: EncodedSample
    key: str | None = None  # reference-cache key (miadpo.fingerprint), when a cache is attached
    reference: Sequence[float] | None = None  # the cached reference log-probs of the pair, when there are some
    negative: EncodedSample | None = None


class ReferenceRows(Protocol):
    """Where cached reference log-probs come from (``miadpo.dpo.reference_cache.ReferenceCache``)."""

    def row(self, key: str, with_negative: bool = False) -> Sequence[float] | None:
        """The pair's cached row, or None when it is not cached (or lacks the negative asked for)."""


class PairDataset(Dataset):
    """Loads a pair's images once and encodes chosen and rejected against the same processed images; with
    ``image_negatives``, also the chosen answer against the pair's ``rejected_images`` (when it has them)."""

    def __init__(self, records: Sequence[PairRecord], roots: ImageRoots, adapter: ModelAdapter,
                 max_length: int, images: ImageOptions | None = None, image_negatives: bool = False) -> None:
        self.records = list(records)
        self.roots = roots
        self.adapter = adapter
        self.max_length = max_length
        self.images = images or ImageOptions()
        self.image_negatives = image_negatives
        self.keys: list[str] = []  # reference-cache keys, set by attach_reference
        self.reference: ReferenceRows | None = None

    def attach_reference(self, cache: ReferenceRows) -> None:
        """Serve each pair's cached reference log-probs (a ``miadpo.dpo.reference_cache.ReferenceCache``) with it."""
        self.keys = [pair_key(record, self.roots) for record in self.records]
        self.reference = cache

    def has_negative(self, index: int) -> bool:
        """Whether pair ``index`` is trained with its image-side negative."""
        return self.image_negatives and self.records[index].rejected_images is not None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> EncodedPair:
        record = self.records[index]
        pictures = load_record_images(self.roots, record.images, self.images, f"pair {record.id}")
        images = self.adapter.process_images(pictures)
        key = self.keys[index] if self.keys else None
        with_negative = self.has_negative(index)
        reference = None
        if key is not None and self.reference is not None:
            reference = self.reference.row(key, with_negative)
        negative = None
        if with_negative:
            assert record.rejected_images is not None
            others = load_record_images(self.roots, record.rejected_images, self.images, f"pair {record.id}")
            negative = self.adapter.encode(self.adapter.process_images(others), record.prompt, record.chosen,
                                           self.max_length)
        return EncodedPair(record.id, self.adapter.encode(images, record.prompt, record.chosen, self.max_length),
                           self.adapter.encode(images, record.prompt, record.rejected, self.max_length), key,
                           reference, negative)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch drawn from (seed, epoch) alone, so that a resumed run sees the order an
    uninterrupted one would; ``start`` skips the samples already trained on in a resumed epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:  # called by Lightning at every epoch start
        """Set the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        start, self.start = self.start, 0
        yield from order[start:]


class ResumeDataOrder(L.Callback):
    """On a run resumed inside an epoch, skip the batches of that epoch the checkpoint has already trained on.

    The position comes from the restored step count: every epoch is ``len(loader)`` batches and each optimizer
    step takes ``accumulate_grad_batches`` of them.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Set the sampler's ``start`` past the batches of a resumed epoch already trained on (with an
        ``EpochShuffleSampler`` only)."""
        loader = trainer.train_dataloader
        if not (isinstance(loader, DataLoader) and isinstance(loader.sampler, EpochShuffleSampler)):
            return
        done = trainer.global_step * trainer.accumulate_grad_batches - trainer.current_epoch * len(loader)
        if 0 < done < len(loader):
            loader.sampler.start = done * (loader.batch_size or 1)


class PairDataModule(L.LightningDataModule):
    """The pair file ``pairs`` (``data.pairs`` by default) → train/val dataloaders of batches made by ``collate`` (a
    pair forward's)."""

    def __init__(self, cfg: DataConfig, adapter: ModelAdapter, collate: Callable[[list[EncodedPair]], object],
                 seed: int = 0, image_negatives: bool = False, pairs: str | Path | None = None) -> None:
        super().__init__()
        pairs = pairs if pairs is not None else cfg.pairs
        if not pairs:
            raise ValueError(f"data={cfg.name}: data.pairs is not set; point it at a pair JSONL, or let the "
                             f"recipe's preparation step (data.prepare={DataPreparation(cfg.prepare).value}) make one "
                             "first")
        self.pairs = Path(pairs)
        self.image_negatives = image_negatives  # encode each pair's rejected_images too (dpo.conditional_weight > 0)
        self.cfg = cfg
        self.adapter = adapter
        self.collate = collate
        self.seed = seed
        self.roots = ImageRoots.of(cfg)
        self.images = ImageOptions.of(cfg)
        self.train_set: PairDataset | None = None
        self.val_set: PairDataset | None = None
        self.report: BadRecordReport | None = None
        self.guard: LengthGuardResult | None = None
        self.max_length = adapter.token_budget(cfg.max_length)

    def setup(self, stage: str | None = None) -> None:
        """Read and validate the pairs, apply the length guard and split the kept pairs into ``train_set`` and
        ``val_set`` (once)."""
        if self.train_set is not None:
            return
        path = self.pairs
        self.report = BadRecordReport(self.cfg.on_bad_record, self.cfg.max_bad_fraction, stage="pairs")
        records = read_pairs(path, self.roots, self.report, self.cfg.check_images, self.images)
        self.guard = apply_length_guard(records, self.roots, self.adapter, self.max_length,
                                        self.cfg.on_too_long, self.images, self.image_negatives)
        if self.guard.bad:
            self._report_bad_images(path, self.guard.bad)
        if self.guard.truncated:
            log.warning("%d pairs have an answer cut to data.max_length=%d (first: %s)",
                        len(self.guard.truncated), self.max_length, self.guard.truncated[:3])
        if self.guard.skipped:
            log.warning("skipped %d pairs longer than data.max_length=%d (first: %s)",
                        len(self.guard.skipped), self.max_length, self.guard.skipped[:3])
        if not self.guard.kept:
            raise BadRecordError(f"no pair of {path} fits data.max_length={self.max_length}: "
                                 f"first skipped {self.guard.skipped[:3]}")
        if self.image_negatives:
            self._check_negatives(path, self.guard)
        train, val = split_train_val(self.guard.kept, self.cfg.val_fraction, self.seed)
        log.info("pairs: %d train, %d val from %s", len(train), len(val), path)
        self.train_set = PairDataset(train, self.roots, self.adapter, self.max_length, self.images,
                                     self.image_negatives)
        self.val_set = PairDataset(val, self.roots, self.adapter, self.max_length, self.images,
                                   self.image_negatives)

    def _check_negatives(self, path: Path, guard: LengthGuardResult) -> None:
        """The conditional term needs pairs with ``rejected_images``: none at all is an error naming the file; the
        pairs without one are trained by the text term alone (counted)."""
        with_negative = sum(1 for record in guard.kept if record.rejected_images is not None)
        if not with_negative:
            raise BadRecordError(
                f"dpo.conditional_weight > 0 needs pairs with rejected_images, and no pair of {path} has one: build "
                "them at augmentation (data.augment.negatives.kind=replace, companion or noise) or set "
                "dpo.conditional_weight=0")
        without = len(guard.kept) - with_negative
        if without or guard.negatives_dropped:
            log.warning("image-side negatives: %d of %d pairs have none (%d dropped: data.max_length would cut the "
                        "chosen answer); they are trained by the text term alone", without, len(guard.kept),
                        len(guard.negatives_dropped))

    def _report_bad_images(self, path: Path, bad: Sequence[tuple[str, str]]) -> None:
        """Pairs whose images the length guard could not open (unchecked by the reader, or too large under
        ``on_large_image=skip``): bad records with their line, under ``data.on_bad_record``."""
        assert self.report is not None
        lines = {str(raw.value["id"]): raw.line for raw in iter_raw_records(path)
                 if isinstance(raw.value, dict) and "id" in raw.value}
        for record_id, reason in bad:
            self.report.add(BadRecord(str(path), lines.get(record_id, 0), record_id, reason))
        self.report.finish()

    def _loader(self, dataset: PairDataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """The train loader, in a fresh ``EpochShuffleSampler`` order each epoch."""
        assert self.train_set is not None, "call setup() first"
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        """The val loader, in order; an empty list when no pair went to val."""
        assert self.val_set is not None, "call setup() first"
        return self._loader(self.val_set, shuffle=False) if len(self.val_set) else []

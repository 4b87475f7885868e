"""The selection stage: augmented records → candidates (sharded, resumable, cached) → pairs (rules).

Layout under ``data.out_dir``::

    selection/<candidates fingerprint>/
        manifest.json                 what produced the candidates
        candidates.rank<r>.jsonl      per-rank shards, appended a batch at a time (resume reads them)
        candidates.jsonl              all candidates in record order, written once every shard is done
        pairs-<rules fingerprint>/    pairs.jsonl, report.json, report.txt, decisions.jsonl, trl.jsonl,
                                      llamafactory.json, dataset_info.json

The candidates fingerprint covers the augmented records, the model and its weights, the template, the
generation and noise settings, the layer and the seed; the rules fingerprint covers the thresholds, operators
and post-selection bounds — so changing only a threshold reuses the candidates and generates nothing.

The candidates directory is a ``StageCache`` (``miadpo.data.stage_cache``: key ``selection_key``, manifest, lock,
done marker ``candidates.jsonl``, rank shards). While the candidates are not finished, rank 0 holds
``selection.lock`` in their directory (:mod:`miadpo.locks`)
from before the predict loop starts the other ranks until the merge: a second, independent run of the same
candidates fails at once naming the holder (its other ranks never start writing: they wait for its rank 0).
Finished candidates are read by any number of runs without the lock.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from miadpo.augment.runner import RECORDS_FILE, augmentation_finished, run_augmentation
from miadpo.config import DataConfig, ExportImagePaths, SelectionConfig
from miadpo.data.images import ImageOptions
from miadpo.data.jsonl import append_jsonl, atomic_replace, completed_ids, read_jsonl, refuse_symlink
from miadpo.data.pairs import ImageRoots, PairRecord, write_pairs
from miadpo.data.stage_cache import StageCache
from miadpo.fingerprint import file_sha1, selection_key, weights_identity
from miadpo.models.base import ModelAdapter
from miadpo.select.candidates import CandidateGenerator, SelectionInput, selection_inputs
from miadpo.select.capture import resolve_layer
from miadpo.select.records import Candidate, read_candidates
from miadpo.select.rules import LLAMAFACTORY_DATASET_INFO, report_text, select_pairs, to_llamafactory, to_trl

log = logging.getLogger(__name__)
CANDIDATES_FILE = "candidates.jsonl"
LOCK_FILE = "selection.lock"
PAIRS_FILE = "pairs.jsonl"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def candidates_identity(adapter: ModelAdapter, data: DataConfig, selection: SelectionConfig, seed: int
                        ) -> dict[str, Any]:
    """What the candidates depend on (records, model weights, template, generation, noise, layer, images, seed):
    their cache key."""
    model = adapter.cfg
    return {
        "records_sha1": file_sha1(Path(data.out_dir) / RECORDS_FILE),
        "model": {"name": model.name, "family": model.family, "path": model.path, "dtype": model.dtype,
                  "pad_to_square": model.pad_to_square, "weights": weights_identity(adapter.cfg, adapter.model)},
        "template": model.template,
        "generation": _plain(selection.generation),
        "noise": _plain(selection.noise),
        "layer": resolve_layer(adapter, selection.layer),
        "attention_maps": selection.save_attention_maps,
        "right_answer_negatives": str(selection.right_answer_negatives),
        "images": {"max_image_pixels": data.max_image_pixels, "on_large_image": str(data.on_large_image)},
        "seed": seed,
        "version": 2,  # 2: weights identified by content
    }


def rules_identity(selection: SelectionConfig, seed: int) -> dict[str, Any]:
    """What the pairs depend on beside the candidates (selection rule, thresholds, filters, seed): their cache key."""
    return {"name": selection.name, "thresholds": _plain(selection.thresholds),
            "operators": _plain(selection.operators), "min_perplexity": selection.min_perplexity,
            "post": _plain(selection.post), "seed": seed}


SHARDS = "candidates.rank*.jsonl"  # one per rank, merged into CANDIDATES_FILE


def candidates_cache(out_dir: Path, identity: dict[str, Any]) -> StageCache:
    """The candidates directory of ``identity``: ``<data.out_dir>/selection/<selection_key(identity)>/``."""
    return StageCache.keyed(out_dir / "selection", identity, selection_key, what="the selection candidates directory",
                            lock_name=LOCK_FILE, done_name=CANDIDATES_FILE)


class CandidatePredictor(L.LightningModule):
    """Lightning wrapper so the predict loop (and its DDP sharding) drives candidate generation."""

    def __init__(self, generator: CandidateGenerator) -> None:
        super().__init__()
        self.generator = generator
        self.model = generator.adapter.model

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        """The batch as it is (selection inputs, not tensors)."""
        return batch  # records, not tensors: the generator moves what it builds

    def predict_step(self, batch: list[SelectionInput], batch_idx: int) -> list[Candidate]:
        """The candidates of a batch of selection inputs."""
        return self.generator(batch)


class ShardWriter(BasePredictionWriter):
    """Appends each batch's candidates to this rank's shard and flushes (a kill loses at most one batch)."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self.directory: Path | None = None  # set once the candidates directory is known
        self.kept = self.seen = 0

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Appends the batch's candidates to this rank's shard."""
        assert self.directory is not None
        shard = self.directory / f"candidates.rank{trainer.global_rank}.jsonl"
        refuse_symlink(shard)
        with shard.open("a", encoding="utf-8") as f:
            append_jsonl(f, (c.to_json() for c in prediction))
        self.seen += len(prediction)
        self.kept += sum(1 for c in prediction if c.answer and not c.correct)


class CandidateProgress(TQDMProgressBar):
    """Predict progress with wrong answers (pair candidates) / seen."""

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        """Shows wrong answers / answers seen beside the bar."""
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        writer = next(cb for cb in trainer.callbacks if isinstance(cb, ShardWriter))
        self.predict_progress_bar.set_postfix_str(f"wrong answers {writer.kept}/{writer.seen}")


class SelectionStage:
    """Runs the stage for one (model, data recipe, selection config)."""

    def __init__(self, adapter: ModelAdapter, data: DataConfig, selection: SelectionConfig, seed: int) -> None:
        self.adapter = adapter
        self.data = data
        self.selection = selection
        self.seed = seed
        self.roots = ImageRoots.of(data)

    def prepare(self, rank: int = 0) -> tuple[StageCache, list[SelectionInput]]:
        """Augment if needed (rank 0); fix the candidates cache; return it and every input (record order).

        Other ranks only read the augmentation: Lightning's launcher starts them once rank 0 finished it; ranks
        started together with rank 0 (torchrun, srun) need it augmented beforehand."""
        if rank != 0 and self.data.source and not augmentation_finished(self.data, self.seed):
            raise RuntimeError(
                f"rank {rank}: the augmentation in {self.data.out_dir} is not finished; rank 0 augments before the "
                "predict loop starts the other ranks (trainer.devices=N), or run `python -m miadpo.augment` with "
                "the same data.* and seed first when all ranks are started at once (torchrun, srun)")
        if rank == 0 and (self.data.source or not (Path(self.data.out_dir) / RECORDS_FILE).exists()):
            run_augmentation(self.data, self.seed, progress=False)
        identity = candidates_identity(self.adapter, self.data, self.selection, self.seed)
        cache = candidates_cache(Path(self.data.out_dir), identity)
        cache.record_identity()
        records = read_jsonl(Path(self.data.out_dir) / RECORDS_FILE)
        inputs, skipped = selection_inputs(records, self.selection.generation.max_answer_chars, self.data)
        for reason, count in skipped.items():
            log.info("selection: %d records not selected on (%s)", count, reason)
        return cache, inputs

    @contextmanager
    def writing(self, cache: StageCache, rank: int) -> Iterator[None]:
        """Rank 0 holds the candidates directory while the candidates are not finished (see the module doc)."""
        if rank != 0 or cache.is_done():
            yield
            return
        with cache.writing():
            yield

    def todo(self, cache: StageCache, inputs: Sequence[SelectionInput], rank: int, world_size: int
             ) -> list[SelectionInput]:
        """This rank's share (every world_size-th input of the full list) minus what any shard holds.

        Sharding the full list, not the remaining one, keeps ranks consistent while others write.
        """
        if cache.is_done():
            return []
        done = completed_ids(*cache.shards(SHARDS))
        return [item for item in inputs[rank::world_size] if item.id not in done]

    def generate(self, trainer: L.Trainer, cache: StageCache, inputs: Sequence[SelectionInput]) -> None:
        """Generate this rank's missing candidates through the predict loop."""
        shard = self.todo(cache, inputs, trainer.global_rank, trainer.world_size)
        loader = DataLoader(shard, batch_size=self.selection.generation.batch_size, shuffle=False,
                            collate_fn=list)
        generator = CandidateGenerator(self.adapter, self.selection, self.roots, self.seed, ImageOptions.of(self.data))
        trainer.predict(CandidatePredictor(generator), dataloaders=loader, return_predictions=False)

    def merge(self, cache: StageCache, inputs: Sequence[SelectionInput]) -> list[Candidate]:
        """All shards → candidates.jsonl in record order (rank 0, after every shard finished)."""
        merged = cache.done
        if cache.is_done():
            return read_candidates(merged)
        by_id: dict[str, Candidate] = {}
        for shard in cache.shards(SHARDS):
            for candidate in read_candidates(shard):
                by_id[candidate.id] = candidate
        missing = [item.id for item in inputs if item.id not in by_id]
        if missing:
            raise RuntimeError(f"{len(missing)} candidates missing after generation (first: {missing[:3]})")
        candidates = [by_id[item.id] for item in inputs]
        with atomic_replace(merged) as tmp, tmp.open("w", encoding="utf-8") as handle:
            append_jsonl(handle, (c.to_json() for c in candidates))
        return candidates

    def apply_rules(self, directory: Path, candidates: Sequence[Candidate]) -> Path:
        """Selection + post-selection into pairs-<fingerprint>/; returns the pairs file."""
        out = directory / f"pairs-{selection_key(rules_identity(self.selection, self.seed))}"
        out.mkdir(exist_ok=True)
        result = select_pairs(candidates, self.selection, self.seed)
        write_pairs(out / PAIRS_FILE, result.pairs)
        # Runs applying the same rules to finished candidates (a sweep) may write these at once: each file is
        # replaced whole, never written into by two runs.
        with atomic_replace(out / "decisions.jsonl") as tmp, tmp.open("w", encoding="utf-8") as handle:
            append_jsonl(handle, result.decisions)
        with atomic_replace(out / "report.json") as tmp:
            tmp.write_text(json.dumps(result.report, indent=2) + "\n")
        with atomic_replace(out / "report.txt") as tmp:
            tmp.write_text(report_text(result.report))
        write_exports(out, result.pairs, self.roots, ExportImagePaths(self.selection.export_image_paths))
        log.info("selection: %s", report_text(result.report).replace("\n", "; "))
        return out / PAIRS_FILE


def write_exports(directory: Path, pairs: Sequence[PairRecord], roots: ImageRoots,
                  image_paths: ExportImagePaths = ExportImagePaths.relative) -> None:
    """``trl.jsonl`` and ``llamafactory.json`` + ``dataset_info.json`` of ``pairs`` into ``directory``.

    Image paths are relative to ``directory`` by default (``os.path.relpath``: copy the data tree anywhere and
    they still resolve; LLaMA-Factory resolves them with ``dataset_dir=<directory>``, whose default ``media_dir``
    it is; a TRL user opens ``directory / path``), or absolute."""
    directory = directory.resolve()

    def image_path(rel: str) -> str:
        resolved = roots.resolve(rel)
        return str(resolved) if image_paths is ExportImagePaths.absolute else os.path.relpath(resolved, directory)

    paths = [[image_path(p) for p in pair.images] for pair in pairs]
    negatives = [None if pair.rejected_images is None else [image_path(p) for p in pair.rejected_images]
                 for pair in pairs]
    with atomic_replace(directory / "trl.jsonl") as tmp, tmp.open("w", encoding="utf-8") as handle:
        append_jsonl(handle, [to_trl(p, images, rejected) for p, images, rejected in zip(pairs, paths, negatives)])
    with atomic_replace(directory / "llamafactory.json") as tmp:
        rows = [to_llamafactory(p, images, rejected) for p, images, rejected in zip(pairs, paths, negatives)]
        tmp.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    with atomic_replace(directory / "dataset_info.json") as tmp:
        tmp.write_text(json.dumps({"miadpo": {"file_name": "llamafactory.json", **LLAMAFACTORY_DATASET_INFO}},
                                  indent=2) + "\n")


def run_selection(adapter: ModelAdapter, data: DataConfig, selection: SelectionConfig, seed: int,
                  trainer_kwargs: dict[str, Any], strategy: Any = "auto") -> Path | None:
    """The whole stage; returns the pairs file on rank 0 (None on other ranks).

    Rank 0 augments (if needed) before the predict loop starts the other ranks, which then find the
    augmentation finished; each rank writes its own shard; rank 0 merges and applies the rules. Rank 0 holds the
    candidates directory's lock from before the predict loop until the merge.
    """
    writer = ShardWriter()
    callbacks: list[L.Callback] = [writer]
    if trainer_kwargs.get("enable_progress_bar", True):
        callbacks.append(CandidateProgress())
    trainer = L.Trainer(**trainer_kwargs, strategy=strategy, callbacks=callbacks, logger=False,
                        enable_checkpointing=False, use_distributed_sampler=False)
    stage = SelectionStage(adapter, data, selection, seed)
    cache, inputs = stage.prepare(trainer.global_rank)
    writer.directory = cache.directory
    with stage.writing(cache, trainer.global_rank):
        stage.generate(trainer, cache, inputs)
        trainer.strategy.barrier()
        if trainer.global_rank != 0:
            return None
        candidates = stage.merge(cache, inputs)
    return stage.apply_rules(cache.directory, candidates)

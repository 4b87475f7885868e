"""The augmentation stage: plan (seeded, in one process) → compose (worker pool) → write in plan order.

Every random decision is made by the planner (``miadpo.augment.plan``) from ``seed`` before any worker starts, each
format (``miadpo.augment.registry``) drawing its own, and records are written
in plan order, so the output is identical for any number of workers. Records go to
``<data.out_dir>/records.jsonl`` (failed compositions to ``skipped.jsonl``) one line at a time; a re-run skips
the jobs already written. ``augment_manifest.json`` holds the fingerprint of what produced the directory, and
``augment_summary.json`` marks it finished (never written when no record was).

Each skipped composition is stored with the size and modification time of its input files; a rerun retries
those whose inputs changed (a fixed or restored image), or every skipped one with
``data.augment.retry_skipped=true``, and leaves the finished records as they are (the file is put back in plan
order, so the output is that of a clean run). A run that writes holds ``augment.lock`` in the output directory
(:mod:`miadpo.locks`): a second, independent run fails at once naming the holder. A finished output is read
without the lock.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from PIL import Image
from tqdm import tqdm

from miadpo.augment.negatives import noisy_image, same_pixels
from miadpo.augment.plan import Planner
from miadpo.augment.records import AugmentedRecord, AugmentMeta
from miadpo.augment.registry import Job, format_named
from miadpo.augment.source import read_llava_source
from miadpo.config import BadRecordPolicy, DataConfig, GridAugmentConfig, NegativeKind
from miadpo.data.images import ImageOptions, load_record_image
from miadpo.data.jsonl import append_jsonl, atomic_replace, read_jsonl, repair_tail
from miadpo.data.pairs import BadRecordError, BadRecordReport, ImageRoots
from miadpo.data.stage_cache import StageCache
from miadpo.fingerprint import augmentation_key, file_sha1
from miadpo.text import markdown_table

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the output for the same inputs changes
RECORDS_FILE = "records.jsonl"
SKIPPED_FILE = "skipped.jsonl"
MANIFEST_FILE = "augment_manifest.json"
SUMMARY_FILE = "augment_summary.json"
LOCK_FILE = "augment.lock"


@dataclass
class AugmentSummary:
    """What an augmentation wrote (records per format and N), skipped (by reason) and found not eligible."""

    out_dir: Path
    written: Counter[str] = field(default_factory=Counter)  # "grid N=4" → count
    skipped: Counter[str] = field(default_factory=Counter)  # reason → count
    ineligible: Counter[str] = field(default_factory=Counter)
    resumed: int = 0

    def save(self) -> None:
        """``augment_summary.json``, written last: it marks the output finished."""
        fields = {"written": self.written, "skipped": self.skipped, "ineligible": self.ineligible}
        with atomic_replace(self.out_dir / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, out_dir: Path) -> AugmentSummary:
        """The summary of a finished output."""
        fields = json.loads((out_dir / SUMMARY_FILE).read_text())
        return cls(out_dir, Counter(fields["written"]), Counter(fields["skipped"]), Counter(fields["ineligible"]))

    def table(self) -> str:
        """Records per format and N, then the skipped and ineligible counts, as a markdown table."""
        rows: list[list[object]] = []
        for key, count in sorted(self.written.items()):
            fmt, n = key.split(" N=")
            rows.append([fmt, n, count])
        rows.append(["total", None, sum(self.written.values())])  # None: a blank cell, "| |"
        for title, counter in (("skipped", self.skipped), ("not eligible", self.ineligible)):
            rows += [[f"{title}: {reason}", None, count] for reason, count in sorted(counter.items())]
        return markdown_table(["format", "N", "records"], rows)


@dataclass
class Composer:
    """Executes jobs in worker processes: decodes the inputs, composes, writes the JPEG, returns the record."""

    roots: ImageRoots
    grid: GridAugmentConfig
    pip_scale: float
    jpeg_quality: int
    images: ImageOptions
    negative_sigma: float = 0.0  # data.augment.negatives.sigma (noise negatives)

    def _load(self, rel: str, draft: tuple[int, int] | None = None) -> Image.Image:
        """Decode an input (``miadpo.data.images``); with ``draft``, JPEG decoding may shrink by 2–8× while staying at
        least that size."""
        return load_record_image(self.roots, rel, self.images, reduce_to=draft)  # ImageError names path and root

    def _save(self, image: Image.Image, fmt: str, job_id: str) -> str:
        """Write a composition; the file is decoded back before it takes its name, so a short write (a full disk:
        Pillow does not always notice) never becomes a finished composition. OSError naming the path."""
        path = self.roots.out_dir / "images" / fmt / f"{job_id}.jpg"
        try:
            with atomic_replace(path) as tmp:
                image.save(tmp, format="JPEG", quality=self.jpeg_quality)
                with Image.open(tmp) as written:
                    written.load()
                    if written.size != image.size:
                        raise OSError(f"wrote a {written.size[0]}×{written.size[1]} image, not "
                                      f"{image.size[0]}×{image.size[1]}")
        except (OSError, SyntaxError) as exc:  # PIL reports a truncated file as OSError, a garbled one SyntaxError
            raise OSError(getattr(exc, "errno", None), f"writing the composition {path} failed (full disk?): "
                                                       f"{getattr(exc, 'strerror', None) or exc}") from exc
        return self.roots.composed(path)

    def __call__(self, job: Job) -> tuple[AugmentedRecord | None, str | None]:
        """The augmented record of ``job`` and None, or None and why it could not be composed."""
        fmt = format_named(job.format)
        draft = fmt.decode_size(self.grid)
        try:
            images = [self._load(rel, draft) for rel in job.inputs]
        except ValueError as exc:
            return None, str(exc)
        canvas, layout = fmt.compose(images, self.grid, self.pip_scale)
        image_field: str | list[str] = list(job.inputs) if canvas is None else self._save(canvas, job.format, job.id)
        meta = AugmentMeta(job.format, job.n_images, job.target, job.source, job.source_ids, job.inputs, layout)
        record = AugmentedRecord(job.id, image_field, job.conversations, meta)
        if job.negative is not None:
            built = self._negative(job, images, layout, canvas, draft)
            if built is not None:
                record.rejected_image, meta.negative = built
        return record, None

    def _negative(self, job: Job, images: list[Image.Image], layout: dict[str, Any] | None,
                  canvas: Image.Image | None, draft: tuple[int, int] | None
                  ) -> tuple[str | list[str], dict[str, Any]] | None:
        """The record's ``rejected_image`` (the shape of its ``image``) and its ``meta.negative``; None when no
        drawn replacement has pixels other than the target's."""
        plan = job.negative
        assert plan is not None
        fmt = format_named(job.format)
        index = fmt.target_index(job.target)
        replacement, picture = None, None
        if NegativeKind(plan.kind) is not NegativeKind.noise:
            for rel in plan.replacements:
                try:
                    candidate = self._load(rel, draft)
                except ValueError:
                    continue  # an unreadable photograph is not drawn
                if not same_pixels(candidate, images[index]):
                    replacement, picture = rel, candidate
                    break
            else:
                return None
        about = {"kind": plan.kind, "replacement": replacement}
        if not fmt.composite:
            swapped = replacement if replacement is not None else self._save(
                noisy_image(images[index], plan, job.id, self.negative_sigma), f"{job.format}_negative", job.id)
            return [swapped if i == index else rel for i, rel in enumerate(job.inputs)], about
        assert layout is not None and canvas is not None
        negative = fmt.negative_image(images, canvas, layout, index, picture, plan, job.id, self.grid,
                                      self.negative_sigma)
        return self._save(negative, f"{job.format}_negative", job.id), about


def fingerprint(cfg: DataConfig, seed: int) -> dict[str, Any]:
    """What determines the output: source content, seed, format mix and augmentation settings."""
    augment = OmegaConf.to_container(OmegaConf.structured(cfg.augment), resolve=True)
    for key in ("workers", "chunk_size", "retry_skipped"):  # do not change the output
        augment.pop(key)  # type: ignore[union-attr]
    if augment["negatives"]["kind"] == NegativeKind.none.value:  # type: ignore[index]
        augment.pop("negatives")  # type: ignore[union-attr]  # off: the fingerprint of earlier versions
    inputs = {
        "version": FORMAT_VERSION,
        "source_sha1": file_sha1(Path(cfg.source)),
        "seed": seed,
        "formats": {k: float(v) for k, v in cfg.formats.items()},
        "augment": augment,
    }
    inputs = json.loads(json.dumps(inputs, sort_keys=True))  # as stored: dict keys become strings
    inputs["fingerprint"] = augmentation_key(inputs)
    return inputs


def augmentation_cache(out_dir: Path, inputs: dict[str, Any] | None = None) -> StageCache:
    """``data.out_dir`` as the augmentation's cache: a fixed directory whose manifest (``fingerprint``) says which
    configuration's output it holds; ``augment.lock``; done marker ``augment_summary.json``."""
    return StageCache(out_dir, inputs, what="the augmentation output", manifest_name=MANIFEST_FILE,
                      lock_name=LOCK_FILE, done_name=SUMMARY_FILE)


def _wrote_nothing(out_dir: Path) -> bool:
    """Whether ``out_dir`` holds no augmented record (a run that failed or wrote none, e.g. every record bad); reads
    at most the file's first kilobyte."""
    records = out_dir / RECORDS_FILE
    if not records.is_file():
        return True
    with records.open("rb") as handle:
        return not handle.read(1024).strip()


def _check_manifest(out_dir: Path, inputs: dict[str, Any], create: bool = True) -> None:
    """The directory holds this configuration's output or none. A manifest of another configuration over no written
    record (a failed or empty run) does not block: it is replaced, with that run's skip list."""
    cache = augmentation_cache(out_dir, inputs)
    previous = cache.stored_identity()
    if previous is not None and previous.get("fingerprint") != inputs["fingerprint"] and _wrote_nothing(out_dir):
        if not create:
            return
        for stale in (cache.manifest, out_dir / RECORDS_FILE, out_dir / SKIPPED_FILE, cache.done):
            stale.unlink(missing_ok=True)
        previous = None
    if previous is not None:
        if previous.get("fingerprint") != inputs["fingerprint"]:
            changed = sorted(k for k in inputs if k != "fingerprint" and previous.get(k) != inputs[k])
            raise FileExistsError(
                f"{out_dir} holds augmentation output of another configuration (changed: {changed}); "
                "choose another data.out_dir or delete that directory"
            )
    elif (out_dir / RECORDS_FILE).exists():
        raise FileExistsError(f"{out_dir / RECORDS_FILE} exists without {MANIFEST_FILE}; choose another data.out_dir")
    elif create:
        cache.record_identity()


def augmentation_finished(cfg: DataConfig, seed: int) -> bool:
    """Whether ``data.out_dir`` holds a finished augmentation of this configuration (reads only)."""
    cache = augmentation_cache(Path(cfg.out_dir))
    stored = cache.stored_identity()
    if not cache.is_done() or stored is None or not AugmentSummary.load(cache.directory).written:
        return False
    return stored.get("fingerprint") == fingerprint(cfg, seed)["fingerprint"]


def input_files(roots: ImageRoots, inputs: Sequence[str]) -> dict[str, list[int] | None]:
    """Size and modification time of each input image (None: missing or not resolvable), stored with a skip."""
    files: dict[str, list[int] | None] = {}
    for rel in inputs:
        try:
            stat = roots.resolve(rel).stat()
            files[rel] = [stat.st_size, stat.st_mtime_ns]
        except (OSError, ValueError):
            files[rel] = None
    return files


def _skip_entries(path: Path) -> dict[str, dict[str, Any]]:
    """The latest skip entry of each id (a retried composition that failed again appends a newer one)."""
    return {str(entry["id"]): entry for entry in read_jsonl(path)}


def _retry(entry: dict[str, Any], roots: ImageRoots) -> bool:
    """A skipped composition whose input files changed since (or stored before their identity was)."""
    files = entry.get("inputs")
    return not isinstance(files, dict) or files != input_files(roots, list(files))


def _raw_lines(path: Path) -> list[tuple[str, str]]:
    """(id, line) of every record line of a JSONL file, the line kept byte for byte."""
    if not path.exists():
        return []
    with path.open(encoding="utf-8") as handle:
        return [(str(json.loads(line)["id"]), line) for line in handle if line.strip()]


def _put_in_plan_order(records_path: Path, skipped_path: Path, order: dict[str, int]) -> None:
    """Records in plan order (retried ones were appended last), each id once, and the latest skip entry of each
    id not written; every line kept byte for byte, a file already so left alone."""
    records, skipped = _raw_lines(records_path), _raw_lines(skipped_path)
    first: dict[str, str] = {}
    for record_id, line in records:
        first.setdefault(record_id, line)
    latest = {record_id: line for record_id, line in skipped if record_id not in first}
    end = len(order)
    for path, lines, kept in ((records_path, records, first), (skipped_path, skipped, latest)):
        ordered = sorted(kept.items(), key=lambda item: order.get(item[0], end))
        if ordered != lines:
            with atomic_replace(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
                handle.writelines(line for _, line in ordered)


def _finished(out_dir: Path, roots: ImageRoots, retry_all: bool) -> bool:
    """A summary with records (an output without any is never finished) and no skipped composition to retry."""
    if not (out_dir / SUMMARY_FILE).is_file() or not AugmentSummary.load(out_dir).written:
        return False
    return not any(retry_all or _retry(entry, roots) for entry in _skip_entries(out_dir / SKIPPED_FILE).values())


def _ordered_results(composer: Composer, jobs: Sequence[Job], workers: int, chunk_size: int
                     ) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    if workers <= 1 or len(jobs) < 2:
        yield from map(composer, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(composer, jobs, chunksize=chunk_size)


def run_augmentation(cfg: DataConfig, seed: int, workers: int | None = None, progress: bool = True
                     ) -> AugmentSummary:
    """Augment ``data.source`` into ``<data.out_dir>/records.jsonl`` (resuming a partial run).

    A finished output is read without the lock, unless skipped compositions are to be retried (their input
    files changed, or ``data.augment.retry_skipped``); writing holds ``augment.lock`` (fails at once if another
    run holds it)."""
    if not cfg.source:
        raise ValueError("data.source (LLaVA-format JSON) is required for augmentation")
    roots = ImageRoots.of(cfg)
    out_dir = Path(cfg.out_dir)
    inputs = fingerprint(cfg, seed)
    _check_manifest(out_dir, inputs, create=False)
    retry_all = bool(getattr(cfg.augment, "retry_skipped", False))
    if _finished(out_dir, roots, retry_all):
        return AugmentSummary.load(out_dir)
    with augmentation_cache(out_dir, inputs).writing():
        _check_manifest(out_dir, inputs)
        return _augment(cfg, seed, roots, out_dir, workers, progress, retry_all)


def _augment(cfg: DataConfig, seed: int, roots: ImageRoots, out_dir: Path, workers: int | None, progress: bool,
             retry_all: bool) -> AugmentSummary:
    """The stage proper, under the output directory's lock."""
    if _finished(out_dir, roots, retry_all):
        return AugmentSummary.load(out_dir)  # finished by another run meanwhile
    (out_dir / SUMMARY_FILE).unlink(missing_ok=True)  # retrying: unfinished until this run finishes
    for stale in (out_dir / "images").glob("*/*.tmp"):
        stale.unlink()

    report = BadRecordReport(cfg.on_bad_record, cfg.max_bad_fraction, stage="augment")
    records, ineligible = read_llava_source(cfg.source, roots, cfg.augment, report)
    report.finish()
    if not records:
        raise BadRecordError(f"data.source {cfg.source} has no usable single-image record ({dict(ineligible)})")
    planner = Planner(records, cfg, seed)
    jobs = planner.plan()

    records_path, skipped_path = out_dir / RECORDS_FILE, out_dir / SKIPPED_FILE
    for path in (records_path, skipped_path):
        repair_tail(path)
    done = {record_id for record_id, _ in _raw_lines(records_path)}
    skips = _skip_entries(skipped_path)
    retry_all = retry_all or not done  # nothing written yet (a run that wrote no record): retry every skip
    todo = [job for job in jobs if job.id not in done
            and (job.id not in skips or retry_all or _retry(skips[job.id], roots))]
    retried = sum(1 for job in todo if job.id in skips)
    if retried:
        log.info("[augment] retrying %d skipped compositions%s", retried,
                 "" if retry_all else " whose input images changed")
    summary = AugmentSummary(out_dir, ineligible=ineligible + planner.skipped, resumed=len(jobs) - len(todo))
    composer = Composer(roots, cfg.augment.grid, cfg.augment.pip.scale, cfg.augment.jpeg_quality,
                        ImageOptions.of(cfg), float(cfg.augment.negatives.sigma))
    n_workers = cfg.augment.workers if workers is None else workers
    strict = BadRecordPolicy(cfg.on_bad_record) is BadRecordPolicy.error
    try:
        with records_path.open("a", encoding="utf-8") as out, skipped_path.open("a", encoding="utf-8") as skipped:
            results = _ordered_results(composer, todo, n_workers, cfg.augment.chunk_size)
            for job, (record, reason) in tqdm(zip(todo, results), total=len(todo), disable=not progress,
                                              desc="augment", unit="record"):
                if record is not None:
                    append_jsonl(out, [record.to_json()])
                    continue
                append_jsonl(skipped, [{"id": job.id, "source_ids": job.source_ids, "reason": reason,
                                        "inputs": input_files(roots, job.inputs)}])
                if strict:
                    raise BadRecordError(f"[augment] {cfg.source}:{job.source_line} (id={job.source_ids[0]}): "
                                         f"{reason} (data.on_bad_record=error)")
                log.warning("[augment] skipping %s (source %s:%d): %s", job.id, cfg.source, job.source_line, reason)
    finally:
        _put_in_plan_order(records_path, skipped_path, {job.id: i for i, job in enumerate(jobs)})

    for record in read_jsonl(records_path):
        summary.written[f"{record['meta']['format']} N={record['meta']['n_images']}"] += 1
    failures = list(read_jsonl(skipped_path))
    for entry in failures:
        summary.skipped[entry["reason"].split(":")[0]] += 1
    for reason, count in report_reasons(report).items():
        summary.skipped[reason] += count
    if not summary.written:
        reasons = dict(Counter(entry["reason"].split(":")[0] for entry in failures))
        raise BadRecordError(
            f"[augment] 0 records written from {cfg.source}: {len(jobs)} compositions planned, {len(failures)} "
            f"failed ({reasons}; see {skipped_path}), not eligible: {dict(summary.ineligible)}. The output is not "
            "marked finished: fix the inputs (data.source, data.image_root, data.formats) and rerun.")
    failed = len(failures)
    if failed and failed / max(1, len(jobs)) > cfg.max_bad_fraction:
        raise BadRecordError(f"[augment] {failed} of {len(jobs)} compositions failed (> data.max_bad_fraction="
                             f"{cfg.max_bad_fraction}); see {skipped_path}. Written records are kept; a rerun "
                             "retries the compositions whose input images changed.")
    summary.save()
    return summary


def report_reasons(report: BadRecordReport) -> Counter[str]:
    """The bad source records counted by reason (the text before the first colon)."""
    return Counter(bad.reason.split(":")[0] for bad in report.bad)

"""The augmentation plan: every random choice of every record, drawn from one seeded generator before any image is
read. For each source record the planner draws a format of ``data.formats`` (``miadpo.augment.registry``), which
plans its job with the planner's draws; then, with ``data.augment.refusal_fraction``, a refusal job beside it."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from miadpo.augment.formats import has_bbox
from miadpo.augment.negatives import plan_negative
from miadpo.augment.registry import DRAWN_FORMATS, FORMATS, REFUSAL, Job
from miadpo.augment.source import SourceRecord
from miadpo.config import AugmentConfig, DataConfig


def choose_weighted(rng: random.Random, weights: dict[Any, float]) -> Any:
    """One key of ``weights`` drawn by weight (the keys with a positive one); ValueError when there is none."""
    keys = [k for k, w in weights.items() if w > 0]
    if not keys:
        raise ValueError(f"no positive weight in {dict(weights)}")
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def sample_excluding(rng: random.Random, pool: Sequence[str], exclude: set[str], k: int) -> list[str] | None:
    """k distinct items of ``pool`` outside ``exclude``; None if the pool is too small."""
    if len(pool) - len(exclude.intersection(pool)) < k:
        return None
    picked: list[str] = []
    chosen = set(exclude)
    while len(picked) < k:
        item = pool[rng.randrange(len(pool))]
        if item not in chosen:
            chosen.add(item)
            picked.append(item)
    return picked


class Planner:
    """Turns source records into jobs, drawing every random choice from one seeded generator (the ``PlanDraws``
    of the formats); ``skipped`` counts the records left without a job, by reason."""

    def __init__(self, records: Sequence[SourceRecord], cfg: DataConfig, seed: int) -> None:
        self.cfg = cfg
        self.aug: AugmentConfig = cfg.augment
        self.rng = random.Random(seed)
        self.seed = seed
        self.images_by_source: dict[str, list[str]] = {}
        self.grid_records_by_source: dict[str, list[SourceRecord]] = {}
        for record in records:
            self.images_by_source.setdefault(record.source, []).append(record.image)
            if not has_bbox(record.conversations):
                self.grid_records_by_source.setdefault(record.source, []).append(record)
        for source, images in self.images_by_source.items():
            self.images_by_source[source] = sorted(set(images))
        self.records = records
        self.skipped: Counter[str] = Counter()

    def plan(self) -> list[Job]:
        """Every record's job (and refusal job), in source order."""
        weights = {f: float(w) for f, w in self.cfg.formats.items() if w > 0}
        unknown = set(weights) - set(DRAWN_FORMATS)
        if unknown:
            raise ValueError(f"data.formats has unknown formats {sorted(unknown)}; use {', '.join(DRAWN_FORMATS)}")
        jobs: list[Job] = []
        for record in self.records:
            allowed = dict(weights)
            if has_bbox(record.conversations):
                allowed = {f: w for f, w in allowed.items() if FORMATS[f].takes_region_questions}
            if not allowed:
                self.skipped["bounding boxes in the text (excluded from grid and pip)"] += 1
                continue
            fmt = FORMATS[self.choose(allowed)]
            job = fmt.plan(self, record)
            if job is not None:
                if fmt.has_negative:
                    job.negative = plan_negative(self.aug.negatives, self.seed, job.id, fmt.target_index(job.target),
                                                 self.images_by_source[job.source], job.inputs)
                jobs.append(job)
            if self.aug.refusal_fraction and self.rng.random() < self.aug.refusal_fraction:
                refusal = REFUSAL.plan(self, record)
                if refusal is not None:
                    jobs.append(refusal)
        return jobs

    # ----- the draws of the formats' plans (PlanDraws) ---------------------------------------------------------------
    def choose(self, weights: dict[Any, float]) -> Any:
        """One key of ``weights``, drawn by weight."""
        return choose_weighted(self.rng, weights)

    def integer(self, low: int, high: int) -> int:
        """A uniform integer in [low, high]."""
        return self.rng.randint(low, high)

    def sample(self, population: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items of ``population``."""
        return self.rng.sample(population, k)

    def index(self, size: int) -> int:
        """A uniform index below ``size``."""
        return self.rng.randrange(size)

    def companions(self, record: SourceRecord, exclude: set[str], k: int) -> list[str] | None:
        """``k`` other images of the record's source outside ``exclude`` (None, counted: too few)."""
        picked = sample_excluding(self.rng, self.images_by_source[record.source], exclude, k)
        if picked is None:
            self.skipped[f"too few other images in source {record.source!r}"] += 1
        return picked

    def askers(self, record: SourceRecord, k: int) -> list[SourceRecord] | None:
        """``k`` other records of the record's source without box coordinates, each about another image (None,
        counted: too few)."""
        pool = [r for r in self.grid_records_by_source[record.source] if r.image != record.image]
        by_image = {r.image: r for r in pool}
        extra = sample_excluding(self.rng, sorted(by_image), set(), k)
        if extra is None:
            self.skipped["too few other records for a multi-question grid"] += 1
            return None
        return [by_image[image] for image in extra]

    def job(self, record: SourceRecord, fmt: str, n: int, target: int | list[int], inputs: list[str],
            conversations: list[dict[str, str]], source_ids: list[str]) -> Job:
        """The job of ``record`` in format ``fmt``."""
        return Job(f"{fmt}-{record.index:07d}", fmt, n, target, inputs, conversations, record.source, source_ids,
                   record.line)

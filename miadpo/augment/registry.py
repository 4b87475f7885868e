"""The format registry: one class per augmentation format, owning what differs between formats.

Each format says how a source record becomes a job (``plan``, its random draws from the planner's generator), how a
job's images are composed (``compose``), how its image-side negative is built (``negative_image``), which image its
question asks about (``target_index``), and how selection reads it: the box of the asked-about image
(``selection_box``: the attention ratio is read over that box in a composite, over the image's own tokens
otherwise) and the noise of its inputs (``noisy_inputs``).
Their default thresholds, operators and noise are the schema's (``SelectionConfig`` in ``miadpo/config.py``, the
bottom layer every stage reads, keyed by ``AugmentFormat.name``).

The stages look a format up by name (``format_named``) and never compare format names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image

from miadpo.augment.formats import (
    PIP_PHRASES,
    compose_grid,
    compose_pip,
    grid_conversations,
    pip_conversations,
    refusal_conversations,
    sequence_conversations,
    single_conversations,
)
from miadpo.augment.negatives import NegativePlan, negative_grid, negative_pip
from miadpo.augment.noise import add_noise
from miadpo.augment.source import SourceRecord
from miadpo.config import AugmentConfig, GridAugmentConfig, NoiseConfig, NoiseRegion

Box = tuple[float, ...]


@dataclass
class Job:
    """One augmented record with every random choice already made."""

    id: str
    format: str
    n_images: int
    target: int | list[int]
    inputs: list[str]  # source image paths: sequence order, grid tiles row-major, pip [background, target]
    conversations: list[dict[str, str]]
    source: str
    source_ids: list[str]
    source_line: int
    negative: NegativePlan | None = None  # data.augment.negatives (miadpo.augment.negatives)


class PlanDraws(Protocol):
    """What a format's ``plan`` draws from (the planner of ``miadpo.augment.plan``)."""

    aug: AugmentConfig

    def choose(self, weights: dict[Any, float]) -> Any:
        """One key of ``weights``, drawn by weight."""

    def integer(self, low: int, high: int) -> int:
        """A uniform integer in [low, high]."""

    def sample(self, population: Sequence[Any], k: int) -> list[Any]:
        """``k`` distinct items of ``population``."""

    def index(self, size: int) -> int:
        """A uniform index below ``size``."""

    def companions(self, record: SourceRecord, exclude: set[str], k: int) -> list[str] | None:
        """``k`` other images of the record's source outside ``exclude`` (None, counted: too few)."""

    def askers(self, record: SourceRecord, k: int) -> list[SourceRecord] | None:
        """``k`` other records of the record's source, each about another image (None, counted: too few)."""

    def job(self, record: SourceRecord, fmt: str, n: int, target: int | list[int], inputs: list[str],
            conversations: list[dict[str, str]], source_ids: list[str]) -> Job:
        """The job of ``record`` in format ``fmt``."""


class AugmentFormat(ABC):
    """An augmentation format (a subclass per format, registered in ``FORMATS``)."""

    name: ClassVar[str]
    drawn: ClassVar[bool] = True  # a choice of data.formats (refusal: drawn by data.augment.refusal_fraction)
    takes_region_questions: ClassVar[bool] = False  # questions with box coordinates ([x0, y0, x1, y1]) allowed
    multi_image: ClassVar[bool] = True  # a prompt of several images (or of one composed from several)
    composite: ClassVar[bool] = False  # one composed image (its layout in meta) rather than its inputs
    selectable: ClassVar[bool] = True  # selection answers its records
    interference: ClassVar[bool] = False  # its question names one of several images: other-image answers exist
    has_negative: ClassVar[bool] = True  # an image-side negative can be built (data.augment.negatives)

    @abstractmethod
    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job | None:
        """The job of ``record`` in this format (None, counted by the planner: not enough images or records)."""

    def decode_size(self, grid: GridAugmentConfig) -> tuple[int, int] | None:
        """The size the inputs may be decoded down to (JPEG draft mode); None: full size."""
        return None

    def compose(self, images: list[Image.Image], grid: GridAugmentConfig, pip_scale: float
                ) -> tuple[Image.Image | None, dict[str, Any] | None]:
        """The composed image and its layout (None, None: the record shows its inputs)."""
        return None, None

    def target_index(self, target: int | list[int]) -> int:
        """0-based index into the job's inputs of the image the (first) question asks about."""
        return (target[0] if isinstance(target, list) else target) - 1

    def negative_image(self, images: Sequence[Image.Image], canvas: Image.Image, layout: dict[str, Any], index: int,
                       replacement: Image.Image | None, plan: NegativePlan, record_id: str,
                       grid: GridAugmentConfig, sigma: float) -> Image.Image:
        """A composite format's negative: its composition with the asked-about image changed."""
        raise TypeError(f"format {self.name} shows its inputs: its negative swaps one of them")

    def selection_box(self, layout: dict[str, Any] | None, target: int) -> Box | None:
        """The asked-about image's box in the composed image (pixels); None: the record shows its inputs."""
        return None

    def noisy_inputs(self, images: list[Image.Image], noise: NoiseConfig, target: int, box: Box | None,
                     rng: np.random.Generator) -> list[Image.Image]:
        """The selection inputs with noise on the target (``noise.region=target``) or on everything (``whole``)."""
        region = box if NoiseRegion(noise.region) is NoiseRegion.target else None
        return [add_noise(images[0], noise.sigma, region, rng)]


class SequenceFormat(AugmentFormat):
    """Sequence: 2–5 images in a row, the question naming one (``Image{k}``)."""

    name = "sequence"
    takes_region_questions = True
    interference = True

    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job | None:
        """The record at a uniformly drawn position among N − 1 companions of its source."""
        drawn = image_sequence(draws, record)
        if drawn is None:
            return None
        n, target, inputs = drawn
        return draws.job(record, self.name, n, target, inputs, sequence_conversations(record.conversations, n, target),
                         [record.id])

    def noisy_inputs(self, images: list[Image.Image], noise: NoiseConfig, target: int, box: Box | None,
                     rng: np.random.Generator) -> list[Image.Image]:
        """Noise on the asked-about image (``target``) or on every image (``whole``)."""
        chosen = range(len(images)) if NoiseRegion(noise.region) is NoiseRegion.whole else [target - 1]
        return [add_noise(im, noise.sigma, None, rng) if i in chosen else im for i, im in enumerate(images)]


class SingleFormat(SequenceFormat):
    """Single: the source record as the single-image question it is (``<image>\\n<question>``), so that DPO also
    sees the prompts whose ability it must keep."""

    name = "single"
    multi_image = False
    interference = False

    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job:
        """The record as it is, one image."""
        return draws.job(record, self.name, 1, 1, [record.image], single_conversations(record.conversations),
                         [record.id])


class GridFormat(AugmentFormat):
    """Grid Collage: 2–9 tiles labelled ``Image{i}`` in one image, one or more questions each naming its tile."""

    name = "grid"
    composite = True
    interference = True

    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job | None:
        """N tiles; the record's question (and those of other records, each about its own tile) on drawn tiles."""
        grid = draws.aug.grid
        n = int(draws.choose(grid.n_weights))
        questions = min(int(draws.choose(grid.records_per_grid)), n)
        askers = [record]
        if questions > 1:
            extra = draws.askers(record, questions - 1)
            if extra is None:
                return None
            askers += extra
        fillers = draws.companions(record, {r.image for r in askers}, n - len(askers))
        if fillers is None:
            return None
        tiles = draws.sample(range(1, n + 1), len(askers))
        inputs: list[str | None] = [None] * n
        for asker, tile in zip(askers, tiles):
            inputs[tile - 1] = asker.image
        filler_iter = iter(fillers)
        placed = [path if path is not None else next(filler_iter) for path in inputs]
        conversations = grid_conversations([(a.conversations, t) for a, t in zip(askers, tiles)])
        target: int | list[int] = tiles[0] if len(tiles) == 1 else tiles
        return draws.job(record, self.name, n, target, placed, conversations, [a.id for a in askers])

    def decode_size(self, grid: GridAugmentConfig) -> tuple[int, int] | None:
        """One cell: no tile is drawn larger."""
        return grid.cell_size, grid.cell_size  # tiles never exceed one cell

    def compose(self, images: list[Image.Image], grid: GridAugmentConfig, pip_scale: float
                ) -> tuple[Image.Image | None, dict[str, Any] | None]:
        """The labelled grid of the tiles (``compose_grid``)."""
        return compose_grid(images, grid)

    def negative_image(self, images: Sequence[Image.Image], canvas: Image.Image, layout: dict[str, Any], index: int,
                       replacement: Image.Image | None, plan: NegativePlan, record_id: str,
                       grid: GridAugmentConfig, sigma: float) -> Image.Image:
        """The grid with the asked-about tile composed from the replacement, or noised."""
        return negative_grid(images, canvas, layout, index, replacement, plan, record_id, grid, sigma)

    def selection_box(self, layout: dict[str, Any] | None, target: int) -> Box | None:
        """The asked-about tile's box."""
        assert layout is not None
        return tuple(layout["tiles"][target - 1])


class PipFormat(AugmentFormat):
    """Pic-in-Pic: the asked-about picture pasted at the centre of another, the question naming the centre one."""

    name = "pip"
    composite = True

    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job | None:
        """The record's picture pasted on a companion photograph, named by a drawn phrase."""
        background = draws.companions(record, {record.image}, 1)
        if background is None:
            return None
        phrase = PIP_PHRASES[draws.index(len(PIP_PHRASES))]
        return draws.job(record, self.name, 1, 1, [background[0], record.image],
                         pip_conversations(record.conversations, phrase), [record.id])

    def compose(self, images: list[Image.Image], grid: GridAugmentConfig, pip_scale: float
                ) -> tuple[Image.Image | None, dict[str, Any] | None]:
        """The target pasted at the background's centre (``compose_pip``)."""
        return compose_pip(images[1], images[0], pip_scale)

    def target_index(self, target: int | list[int]) -> int:
        """The pasted picture (inputs: background, target)."""
        return 1  # inputs: [background, target]

    def negative_image(self, images: Sequence[Image.Image], canvas: Image.Image, layout: dict[str, Any], index: int,
                       replacement: Image.Image | None, plan: NegativePlan, record_id: str,
                       grid: GridAugmentConfig, sigma: float) -> Image.Image:
        """The composite with the centre box filled by the replacement, or noised."""
        return negative_pip(canvas, layout["box"], replacement, plan, record_id, sigma)

    def selection_box(self, layout: dict[str, Any] | None, target: int) -> Box | None:
        """The pasted picture's box."""
        assert layout is not None
        return tuple(layout["box"])


class RefusalFormat(AugmentFormat):
    """Refusal: a Sequence of N images asked about ``Image{N+1}``, answered that only N were given (drawn beside
    a record's format with ``data.augment.refusal_fraction``)."""

    name = "refusal"
    drawn = False
    takes_region_questions = True
    selectable = False
    has_negative = False

    def plan(self, draws: PlanDraws, record: SourceRecord) -> Job | None:
        """A Sequence of the record's N images asking about ``Image{N+1}``."""
        drawn = image_sequence(draws, record)
        if drawn is None:
            return None
        n, _, inputs = drawn
        return draws.job(record, self.name, n, n + 1, inputs, refusal_conversations(record.conversations, n),
                         [record.id])


def image_sequence(draws: PlanDraws, record: SourceRecord) -> tuple[int, int, list[str]] | None:
    """N, the record's 1-based position (uniform) and the N image paths, or None if too few images."""
    n = int(draws.choose(draws.aug.sequence.n_weights))
    companions = draws.companions(record, {record.image}, n - 1)
    if companions is None:
        return None
    position = draws.integer(1, n)
    return n, position, companions[: position - 1] + [record.image] + companions[position - 1 :]


FORMATS: dict[str, AugmentFormat] = {fmt.name: fmt for fmt in (SequenceFormat(), SingleFormat(), GridFormat(),
                                                               PipFormat(), RefusalFormat())}
REFUSAL = FORMATS[RefusalFormat.name]  # drawn beside a record's format (data.augment.refusal_fraction)
DRAWN_FORMATS = tuple(name for name, fmt in FORMATS.items() if fmt.drawn)  # the choices of data.formats


def format_named(name: str) -> AugmentFormat:
    """The registered format ``name``; ValueError naming the known ones."""
    if name not in FORMATS:
        raise ValueError(f"unknown augmentation format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]

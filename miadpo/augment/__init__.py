"""Augmentation: single-image LLaVA records → multi-image Sequence, Grid Collage and Pic-in-Pic records."""

from miadpo.augment.formats import GRID_LAYOUTS, PIP_PHRASES, compose_grid, compose_pip
from miadpo.augment.plan import Planner
from miadpo.augment.registry import Job
from miadpo.augment.runner import AugmentSummary, run_augmentation
from miadpo.augment.source import SourceRecord, read_llava_source

__all__ = ["GRID_LAYOUTS", "PIP_PHRASES", "AugmentSummary", "Job", "Planner", "SourceRecord", "compose_grid",
           "compose_pip", "read_llava_source", "run_augmentation"]

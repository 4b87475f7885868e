"""Candidate records: what selection knows about one answer of the base model, as ``candidates.jsonl`` holds it.

``CandidateGenerator`` (``miadpo.select.candidates``) builds them, the rules (``miadpo.select.rules``) read them, the
stage (``miadpo.select.stage``) appends them to per-rank shards and merges those into ``candidates.jsonl``.
``to_json`` writes the keys in the order the file has always had (the optional ``attention_maps``, ``negative`` and
``rejected_images`` last, only when present) and the values as they are, so a record read back with ``from_json``
and written again gives the same line, and files written before these classes existed read back as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from miadpo.data.jsonl import read_jsonl


def _fields_of(data: Mapping[str, Any], cls: type, required: tuple[str, ...], optional: tuple[str, ...]
               ) -> dict[str, Any]:
    """The constructor arguments of ``cls`` in ``data``; a missing or unknown key is named."""
    missing = [key for key in required if key not in data]
    unknown = [key for key in data if key not in required and key not in optional]
    if missing or unknown:
        raise ValueError(f"not a {cls.__name__} record (id={data.get('id')!r}): missing keys {missing}, "
                         f"unknown keys {unknown}")
    return {key: data[key] for key in (*required, *optional) if key in data}


@dataclass
class ExtraAnswer:
    """A right answer's extra answer (``selection.right_answer_negatives``), the rejected side of its pair.

    ``kind`` is ``other_image`` (the same question about image ``asked_about``) or ``runner_up`` (the answer that
    starts with the model's second most likely first token; ``asked_about`` is None)."""

    kind: str
    asked_about: int | None
    answer: str
    answer_tokens: int
    logp: float
    perplexity: float

    def to_json(self) -> dict[str, Any]:
        """The answer as a ``candidates.jsonl`` field."""
        return {"kind": self.kind, "asked_about": self.asked_about, "answer": self.answer,
                "answer_tokens": self.answer_tokens, "logp": self.logp, "perplexity": self.perplexity}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ExtraAnswer:
        """The answer of its JSON form (``to_json``)."""
        return cls(**_fields_of(data, cls, _EXTRA_FIELDS, ()))


_EXTRA_FIELDS = tuple(f.name for f in fields(ExtraAnswer))


@dataclass
class Candidate:
    """One selection input, the base model's answer to it and what the rules read of that answer.

    ``ratio`` and ``image_scores`` are None for an empty answer (``image_scores`` also for grid and pic-in-pic,
    whose ratio is a region's share); ``attention_maps`` is set with ``selection.save_attention_maps``, ``negative``
    for a right answer with ``selection.right_answer_negatives``."""

    id: str
    format: str
    n_images: int
    target: int  # 1-based
    images: list[str]  # record paths (the clean images the pair will point at)
    prompt: str
    ground_truth: str
    answer: str
    answer_tokens: int
    ground_truth_tokens: int
    logp: float  # summed log-prob of the answer tokens (and the EOS when generated)
    perplexity: float
    correct: bool  # normalised answer == normalised ground truth
    ratio: float | None
    image_scores: list[float] | None
    layer: int  # the selection layer whose attention gave the ratio
    attention_maps: list[dict[str, Any]] | None = None
    negative: ExtraAnswer | None = None
    rejected_images: list[str] | None = None  # the record's image-side negative (data.augment.negatives)

    def to_json(self) -> dict[str, Any]:
        """The ``candidates.jsonl`` line (as a dict): the optional keys only when set."""
        data = {"id": self.id, "format": self.format, "n_images": self.n_images, "target": self.target,
                "images": self.images, "prompt": self.prompt, "ground_truth": self.ground_truth,
                "answer": self.answer, "answer_tokens": self.answer_tokens,
                "ground_truth_tokens": self.ground_truth_tokens, "logp": self.logp, "perplexity": self.perplexity,
                "correct": self.correct, "ratio": self.ratio, "image_scores": self.image_scores, "layer": self.layer}
        if self.attention_maps is not None:
            data["attention_maps"] = self.attention_maps
        if self.negative is not None:
            data["negative"] = self.negative.to_json()
        if self.rejected_images is not None:
            data["rejected_images"] = self.rejected_images
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Candidate:
        """A line of ``candidates.jsonl`` (or of a rank's shard), as ``json.loads`` gives it."""
        values = _fields_of(data, cls, _REQUIRED_FIELDS, _OPTIONAL_FIELDS)
        if values.get("negative") is not None:
            values["negative"] = ExtraAnswer.from_json(values["negative"])
        return cls(**values)

    @classmethod
    def of(cls, value: Candidate | Mapping[str, Any]) -> Candidate:
        """``value`` itself, or read from its JSON form."""
        return value if isinstance(value, Candidate) else cls.from_json(value)


_OPTIONAL_FIELDS = ("attention_maps", "negative", "rejected_images")
_REQUIRED_FIELDS = tuple(f.name for f in fields(Candidate) if f.name not in _OPTIONAL_FIELDS)


def read_candidates(path: Path) -> list[Candidate]:
    """The candidates of ``candidates.jsonl`` or of a rank's shard (none if the file does not exist)."""
    return [Candidate.from_json(record) for record in read_jsonl(path)]

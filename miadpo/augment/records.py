"""The augmented record, one line of ``<data.out_dir>/records.jsonl``: a LLaVA-format record (``id``, ``image``,
``conversations``) with what the augmentation knows about it (``meta``) and its image-side negative
(``rejected_image``, the shape of ``image``). The composer writes it, selection reads it; evaluation and SFT read
the same lines as any LLaVA-format record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class AugmentMeta:
    """An augmented record's ``meta``: its format, N, the asked-about image(s) (1-based; a grid with several
    questions: one per question), its source and source records, the input photographs (``Job.inputs``), the
    composition's layout (grid tiles, pip box; null for a record showing its inputs) and its negative."""

    format: str
    n_images: int
    target: int | list[int]
    # What the augmentation records beside (a record written by another tool may lack them; selection does not
    # read them, except a composite's layout).
    source: str | None = None
    source_ids: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    layout: dict[str, Any] | None = None
    negative: dict[str, Any] | None = None  # {"kind", "replacement"} where a negative was built

    @property
    def first_target(self) -> int:
        """The image the first question asks about."""
        return int(self.target[0] if isinstance(self.target, list) else self.target)


@dataclass
class AugmentedRecord:
    """One augmented record (see the module doc)."""

    id: str
    image: str | list[str]
    conversations: list[dict[str, str]]
    meta: AugmentMeta
    rejected_image: str | list[str] | None = None

    @property
    def images(self) -> list[str]:
        """The record's image paths as a list."""
        return self.image if isinstance(self.image, list) else [self.image]

    @property
    def rejected_images(self) -> list[str] | None:
        """The negative's image paths as a list (None without a negative)."""
        if self.rejected_image is None:
            return None
        return self.rejected_image if isinstance(self.rejected_image, list) else [self.rejected_image]

    def to_json(self) -> dict[str, Any]:
        """The ``records.jsonl`` line (``meta.negative`` and ``rejected_image`` only where a negative was built)."""
        meta = {key: value for key, value in asdict(self.meta).items() if key != "negative" or value is not None}
        line = {"id": self.id, "image": self.image, "conversations": self.conversations, "meta": meta}
        if self.rejected_image is not None:
            line["rejected_image"] = self.rejected_image
        return line

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AugmentedRecord:
        """The record of a ``records.jsonl`` line; ValueError naming what is missing or malformed."""
        try:
            meta = AugmentMeta(**data["meta"])
            record = cls(str(data["id"]), data["image"], list(data["conversations"]), meta, data.get("rejected_image"))
        except KeyError as missing:
            raise ValueError(f"not an augmented record: {missing} is missing") from None
        except TypeError as error:  # an unknown or missing meta field, or meta not a mapping
            raise ValueError(f"not an augmented record: its meta does not fit ({error})") from None
        if len(record.conversations) < 2:
            raise ValueError("not an augmented record: fewer than two conversation turns")
        return record

"""The DPO batch: B encoded pairs collated for one pair forward, and the log-probs a forward returns.

Each pair forward (``miadpo.dpo.forward``) collates its own batch type: :class:`ConcatenatedBatch` (one padded
batch of 2B full sequences, chosen rows first) or :class:`SharedPrefixBatch` (B left-padded prompts with their
images, 2B right-padded answer rows). ``PairLogps`` is what every forward returns and every loss
(``miadpo.dpo.losses``) reads.

Pairs with an image-side negative (``EncodedPair.negative``: the chosen answer against ``rejected_images``) add
one sequence each — after the 2B rows of a concatenated batch, or as a prompt of its own after the B prompts of a
shared-prefix batch — and ``has_negative`` marks them; their ``PairLogps.negative`` is log π(y_c | I′).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from miadpo.data.dataset import EncodedPair
from miadpo.models.base import ModelAdapter
from miadpo.models.samples import IGNORE_INDEX, EncodedSample

Inputs = dict[str, torch.Tensor]


@dataclass
class PairLogps:
    """Answer log-probs of a batch of pairs under one model: sums and token counts; for pairs with an image-side
    negative (``has_negative``), the chosen answer's summed log-prob against the negative images (0 elsewhere)."""

    chosen: torch.Tensor  # (B,) summed log-probs
    rejected: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,) number of answer tokens
    rejected_tokens: torch.Tensor  # (B,)
    negative: torch.Tensor | None = None  # (B,) log π(y_c | I′) where has_negative, else 0
    has_negative: torch.Tensor | None = None  # (B,) bool

    def detach(self) -> PairLogps:
        """The same log-probs detached from the graph (token counts and ``has_negative`` as they are)."""
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens,
                         None if self.negative is None else self.negative.detach(), self.has_negative)

    def chosen_per_token(self) -> torch.Tensor:
        """The mean log-prob per chosen-answer token over the batch (the SFT term's negative; training health)."""
        return self.chosen.sum() / self.chosen_tokens.sum().clamp(min=1)

    def rows(self) -> torch.Tensor:
        """``(B, 4)`` float rows ``[chosen, rejected, chosen_tokens, rejected_tokens]``, as the reference cache
        stores them; ``(B, 5)`` with the negative log-prob last when the batch has negatives."""
        columns = [self.chosen.float(), self.rejected.float(), self.chosen_tokens.float(), self.rejected_tokens.float()]
        if self.negative is not None:
            columns.append(self.negative.float())
        return torch.stack(columns, dim=1)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, has_negative: torch.Tensor | None = None) -> PairLogps:
        """The inverse of ``rows`` (the 5th column read where ``has_negative``)."""
        negative = None
        if has_negative is not None:
            negative = torch.where(has_negative, rows[:, 4], torch.zeros_like(rows[:, 0]))
        return cls(rows[:, 0], rows[:, 1], rows[:, 2].long(), rows[:, 3].long(), negative, has_negative)


def reference_rows(rows: Sequence[Sequence[float]], width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Cached reference rows (4 or 5 values) as one ``(B, width)`` tensor: the first ``width`` values, a missing
    negative as 0."""
    return torch.tensor([[*r[:width], *[0.0] * (width - len(r))] for r in rows], dtype=torch.float32, device=device)


def negative_needs(has_negative: torch.Tensor | None, size: int) -> list[bool]:
    """Which of ``size`` pairs are trained with their image-side negative (``has_negative``; None: none)."""
    return [False] * size if has_negative is None else [bool(v) for v in has_negative.tolist()]


def scatter_negative(values: torch.Tensor, has_negative: torch.Tensor) -> torch.Tensor:
    """``(B,)`` with the negatives' log-probs ``values`` (one per True of ``has_negative``, in order) and 0 elsewhere
    (differentiable in ``values``)."""
    out = torch.zeros(has_negative.shape, dtype=values.dtype, device=values.device)
    return out.index_put((has_negative.nonzero(as_tuple=True)[0].to(values.device),), values)


@dataclass(kw_only=True)
class PairBatch(ABC):
    """What every DPO batch carries besides its model inputs (a dataclass: Lightning moves its tensors)."""

    ids: list[str]
    keys: list[str] | None = None  # reference-cache keys, when the dataset has a reference cache attached
    reference: torch.Tensor | None = None  # (B, 4 or 5) cached reference: chosen, rejected, their tokens (negative)
    has_negative: torch.Tensor | None = None  # (B,) bool: the pairs with an image-side negative (None: no pair has)

    @property
    def num_pairs(self) -> int:
        """The number of pairs in the batch (B)."""
        return len(self.ids)

    @classmethod
    def fields_of(cls, pairs: Sequence[EncodedPair]) -> dict[str, object]:
        """ids, the negatives' mask, and the cache keys and cached reference log-probs when every pair has them."""
        keys = [p.key for p in pairs]
        references = [p.reference for p in pairs]
        negatives = [p.negative is not None for p in pairs]
        width = 5 if any(negatives) else 4
        return {"ids": [p.id for p in pairs],
                "keys": keys if all(k is not None for k in keys) else None,
                "reference": reference_rows(references, width)  # type: ignore[arg-type]
                if all(r is not None for r in references) else None,
                "has_negative": torch.tensor(negatives) if any(negatives) else None}

    @classmethod
    @abstractmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> PairBatch:
        """The batch of ``pairs`` (each batch type collates its own layout)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device of the batch's model inputs."""

    def cached_reference(self) -> PairLogps | None:
        """The cached reference log-probs served with the batch, or None when it has none."""
        return None if self.reference is None else PairLogps.from_rows(self.reference, self.has_negative)


@dataclass(kw_only=True)
class ConcatenatedBatch(PairBatch):
    """One padded batch of 2B full sequences: the B chosen rows, then the B rejected rows (then the negatives')."""

    inputs: Inputs

    @classmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> ConcatenatedBatch:
        """The chosen, rejected and negative sequences of ``pairs`` as one padded batch."""
        samples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        samples += negative_samples(pairs)
        return cls(inputs=adapter.collate(samples), **cls.fields_of(pairs))  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        """The device of the batch's ``input_ids``."""
        return self.inputs["input_ids"].device


@dataclass(kw_only=True)
class SharedPrefixBatch(PairBatch):
    """B left-padded prompts with their images and 2B right-padded answers (chosen, rejected of each pair); pairs
    with a negative add their negative prompt after the B prompts and its chosen answer after the 2B answers."""

    prompt: Inputs
    answers: Inputs

    @classmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> SharedPrefixBatch:
        """The left-padded prompts and right-padded answers of ``pairs``; ValueError when a pair's chosen and
        rejected do not share their prompt."""
        prompts = []
        for pair in pairs:
            c, r = pair.chosen, pair.rejected
            if c.prompt_length != r.prompt_length or not torch.equal(c.input_ids[: c.prompt_length],
                                                                       r.input_ids[: r.prompt_length]):
                raise ValueError("chosen and rejected of a pair must share their prompt")
            prompts.append(_prompt_of(c))
        negatives = negative_samples(pairs)
        prompts += [_prompt_of(n) for n in negatives]
        prompt = adapter.collate(prompts, padding_side="left")
        prompt.pop("labels")
        rows = [sample for pair in pairs for sample in (pair.chosen, pair.rejected)] + negatives
        answer_ids = [s.input_ids[s.prompt_length:] for s in rows]
        ids = _pad(answer_ids, adapter.tokenizer.pad_token_id)
        labels = _pad([s.labels[s.prompt_length:] for s in rows], IGNORE_INDEX)
        mask = _pad([torch.ones(a.numel(), dtype=torch.long) for a in answer_ids], 0)
        return cls(prompt=prompt, answers={"input_ids": ids, "labels": labels, "attention_mask": mask},
                   **cls.fields_of(pairs))  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        """The device of the answers' ``input_ids``."""
        return self.answers["input_ids"].device


def negative_samples(pairs: Sequence[EncodedPair]) -> list[EncodedSample]:
    """The chosen answers against the negative images, of the pairs that have them (in pair order)."""
    return [p.negative for p in pairs if p.negative is not None]


def _prompt_of(sample: EncodedSample) -> EncodedSample:
    """The prompt part of an encoded sequence (with its images)."""
    n = sample.prompt_length
    return EncodedSample(input_ids=sample.input_ids[:n], labels=sample.labels[:n], image_spans=sample.image_spans,
                         geometries=sample.geometries, pixel_values=sample.pixel_values, prompt_length=n,
                         extra=sample.extra)


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-padded ``(len(rows), max(1, longest))`` long tensor (one column even when every row is empty)."""
    padded = pad_sequence([r.long() for r in rows], batch_first=True, padding_value=value)
    if padded.shape[1] == 0:
        padded = torch.full((len(rows), 1), value, dtype=torch.long)
    return padded

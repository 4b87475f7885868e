"""The DPO batch: B encoded pairs collated for one pair forward, and the log-probs a forward returns.

Each pair forward (``miadpo.dpo.forward``) collates its own batch type: :class:`ConcatenatedBatch` (one padded
batch of 2B full sequences, chosen rows first) or :class:`SharedPrefixBatch` (B left-padded prompts with their
images, 2B right-padded answer rows). ``PairLogps`` is what every forward returns and every loss
(``miadpo.dpo.losses``) reads.
"""

from __future__ import annotations

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
    """Answer log-probs of a batch of pairs under one model: sums and token counts."""

    chosen: torch.Tensor  # (B,) summed log-probs
    rejected: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,) number of answer tokens
    rejected_tokens: torch.Tensor  # (B,)

    def detach(self) -> PairLogps:
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)

    def rows(self) -> torch.Tensor:
        """``(B, 4)`` float rows ``[chosen, rejected, chosen_tokens, rejected_tokens]``, as the reference cache
        stores them."""
        return torch.stack([self.chosen.float(), self.rejected.float(), self.chosen_tokens.float(),
                            self.rejected_tokens.float()], dim=1)

    @classmethod
    def from_rows(cls, rows: torch.Tensor) -> PairLogps:
        """The inverse of ``rows``."""
        return cls(rows[:, 0], rows[:, 1], rows[:, 2].long(), rows[:, 3].long())


@dataclass(kw_only=True)
class PairBatch:
    """What every DPO batch carries besides its model inputs (a dataclass: Lightning moves its tensors)."""

    ids: list[str]
    keys: list[str] | None = None  # reference-cache keys, when the dataset has a reference cache attached
    reference: torch.Tensor | None = None  # (B, 4) cached reference: chosen, rejected, chosen/rejected tokens

    @property
    def num_pairs(self) -> int:
        return len(self.ids)

    @classmethod
    def fields_of(cls, pairs: Sequence[EncodedPair]) -> dict[str, object]:
        """ids, and the cache keys and cached reference log-probs when every pair has them."""
        keys = [p.key for p in pairs]
        references = [p.reference for p in pairs]
        return {"ids": [p.id for p in pairs],
                "keys": keys if all(k is not None for k in keys) else None,
                "reference": torch.tensor(references, dtype=torch.float32)
                if all(r is not None for r in references) else None}

    @classmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> PairBatch:
        """The batch of ``pairs`` (each batch type collates its own layout)."""
        raise NotImplementedError

    def cached_reference(self) -> PairLogps | None:
        return None if self.reference is None else PairLogps.from_rows(self.reference)


@dataclass(kw_only=True)
class ConcatenatedBatch(PairBatch):
    """One padded batch of 2B full sequences: the B chosen rows, then the B rejected rows."""

    inputs: Inputs

    @classmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> ConcatenatedBatch:
        samples = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return cls(inputs=adapter.collate(samples), **cls.fields_of(pairs))  # type: ignore[arg-type]


@dataclass(kw_only=True)
class SharedPrefixBatch(PairBatch):
    """B left-padded prompts with their images and 2B right-padded answers (chosen, rejected of each pair)."""

    prompt: Inputs
    answers: Inputs

    @classmethod
    def collate(cls, adapter: ModelAdapter, pairs: Sequence[EncodedPair]) -> SharedPrefixBatch:
        prompts = []
        for pair in pairs:
            c, r = pair.chosen, pair.rejected
            if c.prompt_length != r.prompt_length or not torch.equal(c.input_ids[: c.prompt_length],
                                                                       r.input_ids[: r.prompt_length]):
                raise ValueError("chosen and rejected of a pair must share their prompt")
            prompts.append(EncodedSample(
                input_ids=c.input_ids[: c.prompt_length], labels=c.labels[: c.prompt_length],
                image_spans=c.image_spans, geometries=c.geometries, pixel_values=c.pixel_values,
                prompt_length=c.prompt_length, extra=c.extra))
        prompt = adapter.collate(prompts, padding_side="left")
        prompt.pop("labels")
        rows = [sample for pair in pairs for sample in (pair.chosen, pair.rejected)]
        answer_ids = [s.input_ids[s.prompt_length:] for s in rows]
        ids = _pad(answer_ids, adapter.tokenizer.pad_token_id)
        labels = _pad([s.labels[s.prompt_length:] for s in rows], IGNORE_INDEX)
        mask = _pad([torch.ones(a.numel(), dtype=torch.long) for a in answer_ids], 0)
        return cls(prompt=prompt, answers={"input_ids": ids, "labels": labels, "attention_mask": mask},
                   **cls.fields_of(pairs))  # type: ignore[arg-type]


def _pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-padded ``(len(rows), max(1, longest))`` long tensor (one column even when every row is empty)."""
    padded = pad_sequence([r.long() for r in rows], batch_first=True, padding_value=value)
    if padded.shape[1] == 0:
        padded = torch.full((len(rows), 1), value, dtype=torch.long)
    return padded

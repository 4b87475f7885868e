"""The DPO batch: how B encoded pairs are collated for a pair forward, and the log-probs a forward returns.

Two layouts, one per pair forward (``miadpo.pair_forward``): ``concatenated`` (one padded batch of 2B full
sequences, chosen rows first) and ``shared_prefix`` (B left-padded prompts with their images, 2B right-padded
answer rows). ``PairLogps`` is what every forward returns and every loss (``miadpo.losses``) reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from miadpo.models.base import IGNORE_INDEX, EncodedSample, ModelAdapter


@dataclass
class PairLogps:
    """Answer log-probs of a batch of pairs under one model: sums and token counts."""

    chosen: torch.Tensor  # (B,) summed log-probs
    rejected: torch.Tensor  # (B,)
    chosen_tokens: torch.Tensor  # (B,) number of answer tokens
    rejected_tokens: torch.Tensor  # (B,)

    def detach(self) -> PairLogps:
        return PairLogps(self.chosen.detach(), self.rejected.detach(), self.chosen_tokens, self.rejected_tokens)


def shared_prefix_batch(adapter: ModelAdapter, chosen: Sequence[EncodedSample], rejected: Sequence[EncodedSample]
                        ) -> dict[str, Any]:
    """Left-padded prompts (B rows) and right-padded answers (2B rows: chosen, rejected of each pair in turn)."""
    prompts = []
    for c, r in zip(chosen, rejected):
        if c.prompt_length != r.prompt_length or not torch.equal(c.input_ids[: c.prompt_length],
                                                                   r.input_ids[: r.prompt_length]):
            raise ValueError("chosen and rejected of a pair must share their prompt")
        prompts.append(EncodedSample(
            input_ids=c.input_ids[: c.prompt_length], labels=c.labels[: c.prompt_length], image_spans=c.image_spans,
            geometries=c.geometries, pixel_values=c.pixel_values, prompt_length=c.prompt_length, extra=c.extra))
    prompt = adapter.collate(prompts, padding_side="left")
    prompt.pop("labels")
    rows = [s for pair in zip(chosen, rejected) for s in pair]
    length = max(1, max(s.answer_length for s in rows))
    ids = torch.full((len(rows), length), adapter.tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, sample in enumerate(rows):
        answer = sample.input_ids[sample.prompt_length :]
        ids[row, : answer.numel()] = answer
        labels[row, : answer.numel()] = sample.labels[sample.prompt_length :]
        mask[row, : answer.numel()] = 1
    return {"prompt": prompt, "answers": {"input_ids": ids, "labels": labels, "attention_mask": mask}}


class PairCollator:
    """Batch of B pairs → the layout its pair forward reads.

    ``concatenated``: ``inputs``, one padded batch of 2B full sequences (chosen rows first, then rejected).
    ``shared_prefix``: ``prompt`` (B left-padded prompts with their images) and ``answers`` (2B answer rows).
    """

    def __init__(self, adapter: ModelAdapter, layout: str = "concatenated") -> None:
        if layout not in ("concatenated", "shared_prefix"):
            raise ValueError(f"unknown pair batch layout {layout!r}")
        self.adapter = adapter
        self.layout = layout

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        chosen: list[EncodedSample] = [item["chosen"] for item in items]
        rejected: list[EncodedSample] = [item["rejected"] for item in items]
        batch: dict[str, Any] = {"ids": [item["id"] for item in items], "num_pairs": len(items)}
        if all("key" in item for item in items):
            batch["keys"] = [item["key"] for item in items]
        if all("reference" in item for item in items):
            # cached reference log-probs: columns chosen, rejected, chosen tokens, rejected tokens
            batch["reference"] = torch.tensor([item["reference"] for item in items], dtype=torch.float32)
        if self.layout == "shared_prefix":
            batch.update(shared_prefix_batch(self.adapter, chosen, rejected))
        else:
            batch["inputs"] = self.adapter.collate(chosen + rejected)
        return batch

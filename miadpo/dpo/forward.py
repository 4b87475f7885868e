"""Pair forwards: a batch of preference pairs → summed answer log-probs of chosen and rejected.

Two exact implementations of the same quantity (``DPOModule`` and the loss never look inside them):

- :class:`ConcatenatedPairForward` — the plain path every mainstream trainer uses: chosen and rejected as two
  full sequences, prompt and images included, in one 2B batch.
- :class:`SharedPrefixPairForward` — the prompt (images included) runs once per pair; its key/value cache, with
  gradients flowing through it, is shared by the chosen and the rejected answer, which continue from it.

In both the LM head runs on the positions that predict answer tokens only, ``chunk`` of them at a time, each chunk
recomputed in the backward pass (:func:`miadpo.models.logprobs.chunked_token_logprobs`): memory for logits does not
grow with the vocabulary × the answers' length.

A pair with an image-side negative adds the chosen answer against the negative images: one more sequence in the
plain path; in the shared-prefix path a second prompt (the negative images change the key/value cache from the
first replaced image on, and every image of a batch runs in the one vision pass) in the same prefill, whose chosen
answer continues from it.

Each takes precomputed image features (``image_features``, from :meth:`PairForward.image_features`): with the
vision tower and projector frozen, ``DPOModule`` runs them once per batch and passes the same features to the
reference and the policy forward (``mm_encoder_outputs``, as transformers' VLM forwards take them; no model method
is replaced).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from miadpo.data.dataset import EncodedPair
from miadpo.dpo.batch import ConcatenatedBatch, PairBatch, PairLogps, SharedPrefixBatch, scatter_negative
from miadpo.models.base import ModelAdapter
from miadpo.models.loading import CACHE_NAME
from miadpo.models.logprobs import chunked_token_logprobs
from miadpo.models.samples import IGNORE_INDEX

# Answer tokens whose vocabulary-wide logits exist at once (chunked_token_logprobs): 64 × 262k fp32 logits are 64 MiB.
LOGPROB_CHUNK = 64

LogitsOf = Callable[[torch.Tensor], torch.Tensor]


def answer_logps(hidden: torch.Tensor, labels: torch.Tensor, logits_of: LogitsOf, chunk: int = LOGPROB_CHUNK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of answer-token log-probs and the number of answer tokens.

    ``hidden[b, t]`` (through ``logits_of``, the LM head) predicts token ``t + 1``; positions whose label is
    IGNORE_INDEX contribute nothing.
    """
    return token_logps(hidden[:, :-1], labels[:, 1:], logits_of, chunk)


def token_logps(hidden: torch.Tensor, labels: torch.Tensor, logits_of: LogitsOf, chunk: int = LOGPROB_CHUNK
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over positions of log p(labels[b, t] | logits_of(hidden[b, t])) where the label is not IGNORE_INDEX; the
    LM head runs on those positions only, ``chunk`` at a time (:func:`chunked_token_logprobs`)."""
    mask = labels != IGNORE_INDEX
    values = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
    values[mask] = chunked_token_logprobs(hidden[mask], labels[mask], logits_of, chunk)
    return values.sum(-1), mask.sum(-1)


class PairForward(ABC):
    """A batch of pairs → answer log-probs. Each forward reads its own ``batch_type``, which ``collate`` builds from
    encoded pairs (the data loaders' collate function)."""

    batch_type: type[PairBatch]

    def __init__(self, adapter: ModelAdapter, chunk: int = LOGPROB_CHUNK) -> None:
        self.adapter = adapter
        self.chunk = chunk

    def collate(self, pairs: Sequence[EncodedPair]) -> PairBatch:
        """The batch of ``pairs`` in this forward's layout (``batch_type``)."""
        return self.batch_type.collate(self.adapter, pairs)

    @abstractmethod
    def image_inputs(self, batch: Any) -> dict[str, torch.Tensor]:
        """The inputs of ``batch`` that carry its images (the ones the vision path reads)."""

    def image_features(self, model: nn.Module, batch: Any) -> Any | None:
        """The batch's image features as ``model`` computes them (``None`` without images); pass them back to
        :meth:`__call__` to run the vision path once for several forwards."""
        return self.adapter.image_features(model, self.image_inputs(batch))

    @abstractmethod
    def __call__(self, model: nn.Module, batch: Any, image_features: Any | None = None) -> PairLogps:
        """Answer log-probs of every row; ``image_features`` (from :meth:`image_features`) replace the pixels."""


class ConcatenatedPairForward(PairForward):
    """The plain path: chosen and rejected sequences, prompt and images included, run as one 2B batch."""

    batch_type = ConcatenatedBatch

    def image_inputs(self, batch: ConcatenatedBatch) -> dict[str, torch.Tensor]:
        """The batch's inputs (every row carries its images)."""
        return batch.inputs

    def __call__(self, model: nn.Module, batch: ConcatenatedBatch, image_features: Any | None = None) -> PairLogps:
        """Answer log-probs of every row, from one forward over the full sequences."""
        inputs = self.adapter.with_image_features({k: v for k, v in batch.inputs.items() if k != "labels"},
                                                  image_features)
        hidden, _ = self.adapter.hidden_forward(model, **inputs, use_cache=False)
        logps, counts = answer_logps(hidden, batch.inputs["labels"],
                                     lambda rows: self.adapter.logits_of(model, rows), self.chunk)
        n = batch.num_pairs
        return pair_logps(logps, counts, n, batch.has_negative)


class SharedPrefixPairForward(PairForward):
    """Prompt once per pair (left-padded), then chosen and rejected continue from its key/value cache.

    Exact: the same positions, masks and weights as the plain path, so the same log-probs up to floating-point
    summation order. Position ids come from ``adapter.prompt_position_ids`` (mRoPE for Qwen).
    """

    batch_type = SharedPrefixBatch

    def __init__(self, adapter: ModelAdapter, chunk: int = LOGPROB_CHUNK) -> None:
        if not adapter.shared_prefix_exact:
            raise ValueError(f"{adapter.cfg.family}: the shared-prefix forward cannot repeat this family's "
                             "linear-attention state per answer; use the plain forward (build_pair_forward picks it)")
        super().__init__(adapter, chunk)

    def image_inputs(self, batch: SharedPrefixBatch) -> dict[str, torch.Tensor]:
        """The batch's prompt inputs (the answers carry no images)."""
        return batch.prompt

    def __call__(self, model: nn.Module, batch: SharedPrefixBatch, image_features: Any | None = None) -> PairLogps:
        """Answer log-probs of every row: the prompts' prefill, then each answer from its prompt's key/value cache."""
        prompt, answers = batch.prompt, batch.answers
        positions = self.adapter.prompt_position_ids(prompt)
        prompt_hidden, prefill = self.adapter.hidden_forward(
            model, **self.adapter.with_image_features(prompt, image_features), position_ids=positions, use_cache=True)
        cache = getattr(prefill, CACHE_NAME)
        n = batch.num_pairs
        device = positions.device
        # Answer row → its prompt: 2i and 2i + 1 (pair i's chosen, rejected) → prompt i; 2B + j → prompt B + j (the
        # j-th negative's chosen answer). Without negatives, a plain repeat.
        rows = torch.arange(n, device=device).repeat_interleave(2)
        rows = torch.cat([rows, torch.arange(n, prompt["input_ids"].shape[0], device=device)])

        def expand(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
            if batch.has_negative is None:
                return tensor.repeat_interleave(2, dim=dim)
            return tensor.index_select(dim, rows.to(tensor.device))

        if batch.has_negative is None:
            cache.batch_repeat_interleave(2)
        else:
            cache.batch_select_indices(rows)
        batch_dim = positions.dim() - 2
        length = answers["input_ids"].shape[1]
        following = expand(positions.amax(dim=-1, keepdim=True) + 1 + torch.arange(length, device=device), batch_dim)
        mask = torch.cat([expand(prompt["attention_mask"]), answers["attention_mask"]], dim=1)
        answer_hidden, _ = self.adapter.hidden_forward(model, input_ids=answers["input_ids"], attention_mask=mask,
                                                       position_ids=following, use_cache=False,
                                                       **{CACHE_NAME: cache})
        first = expand(prompt_hidden[:, -1:])  # predicts each answer's first token
        hidden = torch.cat([first, answer_hidden[:, :-1]], dim=1)
        logps, counts = token_logps(hidden, answers["labels"], lambda rows: self.adapter.logits_of(model, rows),
                                    self.chunk)
        return pair_logps(logps, counts, n, batch.has_negative, interleaved=True)


def pair_logps(logps: torch.Tensor, counts: torch.Tensor, n: int, has_negative: torch.Tensor | None,
               interleaved: bool = False) -> PairLogps:
    """Per-row sums and counts → ``PairLogps``: the first 2B rows hold chosen and rejected (chosen rows first, or
    ``interleaved`` chosen, rejected of each pair), the rows after them the negatives' chosen answers."""
    chosen, rejected = (slice(0, 2 * n, 2), slice(1, 2 * n, 2)) if interleaved else (slice(0, n), slice(n, 2 * n))
    negative = None
    if has_negative is not None:
        negative = scatter_negative(logps[2 * n:], has_negative)
    return PairLogps(logps[chosen], logps[rejected], counts[chosen], counts[rejected], negative, has_negative)

"""Per-token log-probabilities from a model's logits: the one gather DPO training and candidate selection share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) of each token under its logits, in float32.

    ``logits`` has shape ``(*S, vocab)`` (any dtype), ``tokens`` integer ids of shape ``S``; the result has shape
    ``S``: ``logits.float().log_softmax(-1)`` gathered at each token. Positions to leave out (padding, prompt
    labels) are the caller's to mask or drop beforehand; every id must be a valid vocabulary index.
    """
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def chunked_token_logprobs(hidden: torch.Tensor, tokens: torch.Tensor,
                           logits_of: Callable[[torch.Tensor], torch.Tensor], chunk: int) -> torch.Tensor:
    """:func:`token_logprobs` of ``logits_of(hidden)`` without the logits of all rows at once.

    ``hidden`` (N, H) are the rows' last hidden states, ``tokens`` (N,) their targets, ``logits_of`` the LM head.
    Rows go through the head ``chunk`` at a time; with gradients each chunk is recomputed in the backward pass
    (activation checkpointing), so neither pass holds more than one chunk's vocabulary-wide logits. ``chunk`` 0:
    every row at once (the logits of all rows are kept for backward, as a plain forward keeps them).
    """
    if chunk <= 0 or hidden.shape[0] <= chunk:
        return token_logprobs(logits_of(hidden), tokens)

    def rows(part: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_logprobs(logits_of(part), targets)

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    return torch.cat([checkpoint(rows, hidden[i : i + chunk], tokens[i : i + chunk], use_reentrant=False)
                      if recompute else rows(hidden[i : i + chunk], tokens[i : i + chunk])
                      for i in range(0, hidden.shape[0], chunk)])

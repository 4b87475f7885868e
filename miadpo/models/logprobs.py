"""Per-token log-probabilities from a model's logits: the one gather DPO training and candidate selection share."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) of each token under its logits, in float32.

    ``logits`` has shape ``(*S, vocab)`` (any dtype), ``tokens`` integer ids of shape ``S``; the result has shape
    ``S``: ``logits.float().log_softmax(-1)`` gathered at each token. Positions to leave out (padding, prompt
    labels) are the caller's to mask or drop beforehand; every id must be a valid vocabulary index.
    """
    return logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

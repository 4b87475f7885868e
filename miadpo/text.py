"""Text conventions every stage shares: the image marker of prompts and answer normalisation."""

from __future__ import annotations

import re
import string

IMAGE_TOKEN = "<image>"  # one per image, in order, in every prompt miadpo reads or writes
RELEASE_IMAGE_TOKEN = "<image-placeholder>"  # the official MIA-DPO release's marker
IMAGE_MARKERS = (IMAGE_TOKEN, RELEASE_IMAGE_TOKEN)
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def image_marker_in(text: str) -> str | None:
    """The first image marker (``<image>`` or the release's ``<image-placeholder>``) found in ``text``, or None.

    An answer must hold none: the marker would become an image token in the labels (or fail the model's count of
    image features)."""
    return next((marker for marker in IMAGE_MARKERS if marker in text), None)


def normalise_answer(text: str) -> str:
    """Case, punctuation and whitespace removed, for "answer ≠ ground truth" and exact-match scoring."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())

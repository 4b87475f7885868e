"""Text conventions every stage shares: the image marker of prompts, answer normalisation and markdown tables."""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Iterable, Sequence

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
    """Case, punctuation, whitespace (any Unicode space: NBSP, tabs, the zero-width space, ...) and invisible format
    characters (joiners, BOM) removed, for "answer ≠ ground truth", "chosen ≠ rejected" and exact-match scoring."""
    visible = "".join(c for c in text.replace("\u200b", " ") if unicodedata.category(c) != "Cf")
    return " ".join(_PUNCTUATION.sub(" ", visible.lower()).split())


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: the header line, the ``|---|---|`` line, one line per row; no trailing newline.

    Each cell is written as ``str(cell)`` between single spaces (``| a | 1.5 |``): numbers are formatted by the
    caller. A None cell is a blank one, ``| |``; an empty string keeps its two spaces, ``|  |``.
    """
    def line(cells: Sequence[object]) -> str:
        return "|" + "".join(" |" if cell is None else f" {str(cell)} |" for cell in cells)

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(row) for row in rows)])


def shown(text: object) -> str:
    """A path or id as a message shows it: as it is when printable, else its ``repr`` (a newline or control
    character in a file name must not start a forged log line)."""
    value = str(text)
    return value if value.isprintable() else repr(value)

"""NLVR2 as released by lil-lab/nlvr (``nlvr2/``): a statement about a left and a right image, True or False.

Published layout (github.com/lil-lab/nlvr, ``nlvr2/README.md`` and ``nlvr2/util/download_images.py``): JSON lines
``dev.json`` / ``test1.json`` / ``test2.json`` (in ``data/`` of the repository, or beside the images), one example
per line with ``identifier`` (``<split>-<set>-<pair>-<sentence>``, e.g. ``dev-850-0-0``), ``sentence``, ``label``
(``"True"`` / ``"False"``), ``left_url``, ``right_url``, ``synset``, ``query``, ``writer``, ``validation``,
``extra_validations``. The images of an example are ``<split>-<set>-<pair>-img0.png`` (left) and ``-img1.png``
(right), unpacked from the released zips into ``<split>/`` (``dev/``, ``test1/``), or ``images/<split>/``.

VLMEvalKit has no NLVR2; the prompt is the one Mantis's authors evaluate NLVR2 with (TIGER-AI-Lab/Mantis
``data/nlvr2/prepare_vqa_v3.py`` + ``mantis/benchmark/eval.py``), with the options in a fixed order instead of
their seeded shuffle: ``<image><image> Here is a statement about the images. Is it true or false?\\n<sentence>\\n
(A) True\\n (B) False\\nAnswer with the option's letter from the given choices directly.``, the left image first.
An answer of "True"/"Yes" or "False"/"No" is read as the option of that polarity. Group: ``NLVR2``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks.mantis import choice_prompt
from miadpo.eval.benchmarks.tables import BadRowError, Row, collect, text_cell
from miadpo.eval.items import EvalItem
from miadpo.eval.sources import ImageFile
from miadpo.text import IMAGE_TOKEN

NAME = "NLVR2"
STATEMENT = f"{IMAGE_TOKEN}{IMAGE_TOKEN} Here is a statement about the images. Is it true or false?\n{{sentence}}"
LABELS = {"True": "A", "False": "B"}


def annotation_file(root: Path, split: str) -> Path:
    """The split's JSON lines file, ``<root>/<split>.json`` or ``<root>/data/<split>.json``; FileNotFoundError if
    neither exists."""
    for candidate in (root / f"{split}.json", root / "data" / f"{split}.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{NAME}: no {split}.json in {root} or {root / 'data'} (the lil-lab/nlvr release)")


def image_folder(root: Path, split: str) -> Path:
    """The split's image folder, ``<root>/<split>`` or ``<root>/images/<split>``; FileNotFoundError if neither
    exists."""
    for candidate in (root / split, root / "images" / split):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"{NAME}: no image folder {root / split} or {root / 'images' / split} (unpack "
                            f"{split}_img.zip there)")


def json_rows(path: Path) -> list[Row]:
    """(file, line, example) of each non-blank line; a line that is not a JSON object is kept as ``{"_error": ...}``
    for the reader to report."""
    rows: list[Row] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                value = {"_error": f"not JSON ({exc.msg} at column {exc.colno})"}
            rows.append((path, number, value if isinstance(value, dict) else {"_error": "not a JSON object"}))
    return rows


def nlvr2_item(row: dict[str, Any], images: Path, options: ImageOptions) -> EvalItem:
    """One NLVR2 example as an item: its left and right images, True as (A) and False as (B); BadRowError or ImageError
    if it cannot be used."""
    if "_error" in row:
        raise BadRowError(row["_error"])
    identifier = text_cell(row, "identifier")
    label = text_cell(row, "label")
    if label not in LABELS:
        raise BadRowError(f"label {label!r} is neither 'True' nor 'False'")
    pair = "-".join(identifier.split("-")[:3])
    sources = [ImageFile(images / f"{pair}-img{side}.png") for side in (0, 1)]
    for source in sources:
        source.check(options)
    prompt, choice = choice_prompt(STATEMENT.format(sentence=text_cell(row, "sentence")), ["True", "False"])
    return EvalItem(identifier, NAME, list(sources), prompt, LABELS[label], options=choice)


def read_nlvr2(root: Path, report: BadRecordReport, options: ImageOptions, split: str = "dev") -> list[EvalItem]:
    """The items of NLVR2's ``split`` under ``root``; bad rows go to ``report`` (``collect``)."""
    annotations, images = annotation_file(root, split), image_folder(root, split)
    return collect(json_rows(annotations), lambda row, file, n: nlvr2_item(row, images, options), report,
                   "identifier")

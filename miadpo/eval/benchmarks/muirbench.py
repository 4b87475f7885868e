"""MuirBench (``MUIRBENCH/MUIRBENCH`` on the Hugging Face hub), test split, prompted as VLMEvalKit's MUIRBench.

Published layout (huggingface.co/datasets/MUIRBENCH/MUIRBENCH: one config, ``data/test-*`` parquet shards; columns
as read by lmms-eval's ``lmms_eval/tasks/muirbench/utils.py``): 2,600 items with the columns ``idx``, ``task``
(Counting, Ordering, Visual Retrieval, ...), ``image_relation``, ``image_type``, ``question`` (with one ``<image>``
marker per image, in order; option texts may hold markers too), ``options`` (a list of option texts),
``answer`` (the letter) and ``image_list`` (a list of image structs), ``counterpart_idx``.

Prompt (VLMEvalKit's ``MUIRDataset.build_prompt`` / ``split_MUIR``, ``vlmeval/dataset/image_mcq.py``):
``<question>\\nA. <option>\\nB. …\\nAnswer with the option's letter from the given choices directly.``, the i-th
``<image>`` marker (question or options) being the i-th image, markers beyond the images removed, images beyond
the markers left out. Groups: ``MuirBench``, ``MuirBench/<task>`` and ``MuirBench/relation=<image_relation>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks.tables import BadRowError, collect, image_cell, split_files, table_rows, text_cell
from miadpo.eval.items import LETTERS, EvalItem, mcq_text, place_images

NAME = "MuirBench"
SPLIT = "test"
COLUMNS = ("idx", "task", "question", "options", "answer", "image_list")


def muirbench_item(row: dict[str, Any], file: Path, number: int, options: ImageOptions) -> EvalItem:
    """One MuirBench row as an item (grouped by ``task`` and ``image_relation``); BadRowError or ImageError if it cannot
    be used."""
    texts, pictures = row["options"], row["image_list"]
    if not isinstance(texts, list) or not texts:
        raise BadRowError(f"options {texts!r} is not a list of option texts")
    if not isinstance(pictures, list) or not pictures:
        raise BadRowError("image_list holds no image")
    choice = {LETTERS[i]: str(t) for i, t in enumerate(texts)}
    answer = text_cell(row, "answer").strip()
    if answer not in choice:
        raise BadRowError(f"answer {answer!r} is not one of the options {', '.join(choice)}")
    images = [image_cell(p, file, f"{file}:{number} image_list[{k}]", options) for k, p in enumerate(pictures)]
    prompt, placed = place_images(mcq_text({"question": text_cell(row, "question")}, choice, muir=True), images)
    groups = [f"{NAME}/{row['task']}"] + ([f"{NAME}/relation={row['image_relation']}"]
                                          if row.get("image_relation") else [])
    return EvalItem(str(row["idx"]), NAME, placed, prompt, answer, options=choice, extra_groups=tuple(groups))


def read_muirbench(root: Path, report: BadRecordReport, options: ImageOptions, cache_version: str | None = None
                   ) -> list[EvalItem]:
    """The items of MuirBench's test split under ``root``; bad rows go to ``report`` (``collect``)."""
    files = split_files(root, SPLIT, NAME, cache_version)
    return collect(table_rows(files, COLUMNS), lambda row, file, n: muirbench_item(row, file, n, options), report,
                   "idx")

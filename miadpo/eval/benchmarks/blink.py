"""BLINK (``BLINK-Benchmark/BLINK`` on the Hugging Face hub), val split, prompted as VLMEvalKit's BLINK.

Published layout (huggingface.co/datasets/BLINK-Benchmark/BLINK: one config per task; columns as on its dataset
card and read by the authors' ``eval/test_benchmark.py`` in zeyofu/BLINK_Benchmark):
``<Task>/val-00000-of-00001.parquet`` for 14 tasks (Art_Style, Counting, Forensic_Detection,
Functional_Correspondence, IQ_Test, Jigsaw, Multi-view_Reasoning, Object_Localization, Relative_Depth,
Relative_Reflectance, Semantic_Correspondence, Spatial_Relation, Visual_Correspondence, Visual_Similarity),
1,901 items, with the columns ``idx`` (``val_<Task>_<k>``), ``question`` (the bare question), ``sub_task``,
``image_1`` … ``image_4`` (image structs, null where unused), ``choices`` (the option texts), ``answer``
(``(A)``-style), ``prompt`` (the authors' own full prompt, not used) and ``explanation``.

Prompt (VLMEvalKit's generic ``ImageMCQDataset.build_prompt``, ``vlmeval/dataset/image_mcq.py``; its BLINK TSV
has the bare question and letter answers): the images first, then ``Question: <question>\\nOptions:\\nA.
<choice 1>\\nB. …\\nPlease select the correct answer from the options above. \\n``. Groups: ``BLINK`` and
``BLINK/<sub_task>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks.tables import BadRowError, collect, image_columns, split_files, table_rows, text_cell
from miadpo.eval.items import LETTERS, EvalItem, mcq_text, place_images

NAME = "BLINK"
SPLIT = "val"
COLUMNS = ("idx", "question", "sub_task", "choices", "answer", "image_1")


def blink_item(row: dict[str, Any], file: Path, number: int, options: ImageOptions) -> EvalItem:
    """One BLINK row as an item (groups ``BLINK`` and ``BLINK/<sub_task>``); BadRowError or ImageError if it cannot be
    used."""
    choices = row["choices"]
    if not isinstance(choices, list) or not choices:
        raise BadRowError(f"choices {choices!r} is not a list of option texts")
    choice = {LETTERS[i]: str(t) for i, t in enumerate(choices)}
    answer = text_cell(row, "answer").strip().strip("()")
    if answer not in choice:
        raise BadRowError(f"answer {row['answer']!r} is not one of the options {', '.join(choice)}")
    images = image_columns(row, 4, file, number, options)
    if not any(images):
        raise BadRowError("no image: image_1 … image_4 are all null")
    prompt, placed = place_images(mcq_text({"question": text_cell(row, "question")}, choice, muir=False), images)
    task = str(row["sub_task"] or file.parent.name)
    return EvalItem(text_cell(row, "idx"), NAME, placed, prompt, answer, options=choice,
                    extra_groups=(f"{NAME}/{task}",))


def read_blink(root: Path, report: BadRecordReport, options: ImageOptions, cache_version: str | None = None
               ) -> list[EvalItem]:
    """The items of BLINK's val split under ``root``; bad rows go to ``report`` (``collect``)."""
    files = split_files(root, SPLIT, NAME, cache_version)
    return collect(table_rows(files, COLUMNS), lambda row, file, n: blink_item(row, file, n, options), report, "idx")

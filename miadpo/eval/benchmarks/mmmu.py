"""MMMU (``MMMU/MMMU`` on the Hugging Face hub), validation split, prompted and scored as VLMEvalKit's MMMU_DEV_VAL.

Published layout (huggingface.co/datasets/MMMU/MMMU: one config per subject; the columns as listed on its dataset
card and read by lmms-eval's ``lmms_eval/tasks/mmmu/utils.py``): ``<Subject>/validation-00000-of-00001.parquet``
for 30 subjects (Accounting, Art, ..., Sociology), 900 items, with the columns

- ``id`` (``validation_<Subject>_<k>``), ``question`` (text with ``<image 1>`` … ``<image 7>`` references),
- ``options`` (a string holding a Python list literal of the option texts; ``[]`` for open questions),
- ``answer`` (the option letter; the answer text for open questions), ``question_type`` (``multiple-choice`` or
  ``open``), ``image_1`` … ``image_7`` (image structs, null where unused), ``explanation``, ``img_type``,
  ``topic_difficulty``, ``subfield``.

Prompt (VLMEvalKit: ``ImageMCQDataset.build_prompt`` and ``MMMUDataset.split_MMMU`` in
``vlmeval/dataset/image_mcq.py``): ``Question: <question>\\nOptions:\\nA. <A>\\n…Please select the correct answer
from the options above. \\n``; each ``<image k>`` (in the question or an option) becomes the image of column
``image_k`` in place (whatever columns before it are null; citing a null column makes the row bad), an image
referenced twice is given twice, one never referenced is left out. Open questions get no options in the
prompt and are scored as VLMEvalKit's ``MMMU_preproc`` does: options {A: the answer, B: "Other Answers"}, answer A —
except those whose answer is a list literal of accepted answers (``"['1.5', '1.50']"``), scored by MMMU's own
open-answer rule (any of them; ``miadpo.eval.open_answers``), where VLMEvalKit compares against the list's text.
Groups: ``MMMU`` and ``MMMU/<Subject>``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks.tables import BadRowError, collect, image_columns, split_files, table_rows, text_cell
from miadpo.eval.items import LETTERS, EvalItem, mcq_text, place_images

NAME = "MMMU"
SPLIT = "validation"
COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")
SUBJECT = re.compile(r"^[a-z]+_(.+)_\d+$")


def option_texts(cell: Any) -> list[str]:
    """MMMU's ``options``: a list literal in a string (or a list)."""
    values = ast.literal_eval(cell) if isinstance(cell, str) else cell
    if not isinstance(values, list) or not all(isinstance(v, str | int | float) for v in values):
        raise BadRowError(f"options {cell!r} is not a list of texts")
    return [str(v) for v in values]


def mmmu_item(row: dict[str, Any], file: Path, number: int, options: ImageOptions) -> EvalItem:
    """One MMMU row as an item (an open question scored as two options, or by its accepted answers); BadRowError or
    ImageError if it cannot be used."""
    item_id = text_cell(row, "id")
    texts = option_texts(row["options"])
    choice = {LETTERS[i]: t for i, t in enumerate(texts)}
    answer = str(row["answer"]).strip()
    if row["question_type"] == "multiple-choice" and choice:
        if answer not in choice:
            raise BadRowError(f"answer {answer!r} is not one of the options {', '.join(choice)}")
    else:
        choice = {}
    images = image_columns(row, 7, file, number, options)
    prompt, placed = place_images(mcq_text({"question": text_cell(row, "question")}, choice, muir=False), images)
    accepted = accepted_answers(answer) if not choice else ()
    if not choice and not accepted:  # MMMU_preproc: an open question scored as two options, the answer being A
        choice, answer = {"A": answer, "B": "Other Answers"}, "A"
    match = SUBJECT.match(item_id)
    subject = match.group(1) if match else file.parent.name
    return EvalItem(item_id, NAME, placed, prompt, answer, options=choice, extra_groups=(f"{NAME}/{subject}",),
                    accepted=accepted)


def accepted_answers(answer: str) -> tuple[str, ...]:
    """The answers an open question accepts when its answer is a list literal (``"['1.5', '1.50']"``: read as
    ``options`` is, by :func:`option_texts`), else ()."""
    if not answer.startswith("["):
        return ()
    try:
        return tuple(option_texts(answer))
    except (BadRowError, ValueError, SyntaxError):
        return ()


def read_mmmu(root: Path, report: BadRecordReport, options: ImageOptions, cache_version: str | None = None
              ) -> list[EvalItem]:
    """The items of MMMU's validation split under ``root``; bad rows go to ``report`` (``collect``)."""
    files = split_files(root, SPLIT, NAME, cache_version)
    return collect(table_rows(files, COLUMNS), lambda row, file, n: mmmu_item(row, file, n, options), report, "id")

"""Mantis-Eval (``TIGER-Lab/Mantis-Eval`` on the Hugging Face hub), test split, prompted as its authors do.

Published layout (huggingface.co/datasets/TIGER-Lab/Mantis-Eval: config ``mantis_eval``; the features declared by
the authors' upload script ``data/upload_test_dataset_to_hf.py`` in TIGER-AI-Lab/Mantis):
``mantis_eval/test-00000-of-00001.parquet``, 217 items, with the columns ``id``, ``question_type``
(``multi-choice`` or ``short-answer``), ``question`` (with ``<image>`` markers), ``images`` (a list of image
structs), ``options`` (a list of option texts, maybe already prefixed ``A.``/``(A)``), ``answer`` (the letter, or the
short answer), ``data_source`` and ``category``.

VLMEvalKit has no Mantis-Eval, so the prompt is the authors' (``mantis/benchmark/eval.py`` and its templates):
missing ``<image>`` markers are added at the front, and markers beyond the row's images stay text (the first markers
take the images; each surplus one reads as the word ``image``, and the row is noted in the report); a multi-choice
question is followed by one line per option, ``\\n (A) <option>`` (an option already holding its letter as ``A.``,
``A:`` or ``A)`` is given as it is), then ``\\nAnswer with the option's letter from the given choices directly.``; a
short-answer question is asked as ``Given the images, answer the following short answer vqa question:\\nQ:
<question>\\nYou can first give your analysis, and then give your final answer as "Final Answer:"`` and scored on
the text after "Final Answer:" (normalised exact match). Multiple-choice answers are read by
``miadpo.eval.scoring.option_letter``, like every benchmark's (the authors take the first letter after "answer:").
Groups: ``Mantis-Eval``, ``Mantis-Eval/<category>`` and ``Mantis-Eval/<question_type>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from miadpo.data.images import ImageOptions
from miadpo.data.pairs import BadRecord, BadRecordReport
from miadpo.eval.benchmarks.tables import BadRowError, collect, image_cell, split_files, table_rows, text_cell
from miadpo.eval.items import LETTERS, EvalItem
from miadpo.text import IMAGE_TOKEN

NAME = "Mantis-Eval"
SPLIT = "test"
COLUMNS = ("id", "question_type", "question", "images", "options", "answer")
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
# What a surplus <image> marker (more markers than images) reads as: text, not an image.
SURPLUS_MARKER = "image"
SHORT_ANSWER = ("Given the images, answer the following short answer vqa question:\nQ: {question}\n"
                'You can first give your analysis, and then give your final answer as "Final Answer:"')


def _prefix(letter: str) -> re.Pattern[str]:
    return re.compile(rf"^\s*\(?{letter}\s*[).:]\s*")


def choice_prompt(question: str, texts: list[str]) -> tuple[str, dict[str, str]]:
    """The authors' multi-choice prompt and the options by letter (their texts without a letter prefix)."""
    lines, choice = [], {}
    for letter, text in zip(LETTERS, texts):
        prefixed = any(f"{letter}{mark}" in text.upper() for mark in "):.")
        lines.append(f"\n {text}" if prefixed else f"\n ({letter}) {text}")
        choice[letter] = _prefix(letter).sub("", text) if prefixed else text
    return f"{question}{''.join(lines)}\n{CHOICE_INSTRUCTION}", choice


def with_markers(question: str, count: int) -> tuple[str, int]:
    """The question with one ``<image>`` per image, and how many markers were surplus: missing markers are added at
    the front, and markers beyond the row's images stay text (the word ``image``), as in the authors' evaluation,
    which gives the images to the first markers."""
    pieces = question.split(IMAGE_TOKEN)
    surplus = max(len(pieces) - 1 - count, 0)
    if surplus:
        question = IMAGE_TOKEN.join(pieces[: count + 1]) + "".join(f"{SURPLUS_MARKER}{p}" for p in pieces[count + 1 :])
    return IMAGE_TOKEN * max(count - (len(pieces) - 1), 0) + question, surplus


def mantis_item(row: dict[str, Any], file: Path, number: int, options: ImageOptions, notes: list[BadRecord]
                ) -> EvalItem:
    """One Mantis-Eval row as an item prompted by its ``question_type``; a row with surplus ``<image>`` markers is also
    added to ``notes``."""
    pictures = row["images"]
    if not isinstance(pictures, list) or not pictures:
        raise BadRowError("images holds no image")
    images = [image_cell(p, file, f"{file}:{number} images[{k}]", options) for k, p in enumerate(pictures)]
    question, surplus = with_markers(text_cell(row, "question"), len(images))
    if surplus:
        notes.append(BadRecord(str(file), number, text_cell(row, "id"), f"{surplus} <image> marker(s) beyond the "
                               f"row's {len(images)} image(s) read as the text {SURPLUS_MARKER!r}"))
    kind = text_cell(row, "question_type")
    answer = text_cell(row, "answer").strip()
    if kind == "multi-choice":
        texts = row["options"]
        if not isinstance(texts, list) or not texts:
            raise BadRowError(f"options {texts!r} is not a list of option texts")
        prompt, choice = choice_prompt(question, [str(t) for t in texts])
        letter = answer.strip("()\n ")[:1]
        if letter not in choice:
            raise BadRowError(f"answer {answer!r} is not one of the options {', '.join(choice)}")
        answer = letter
    elif kind == "short-answer":
        prompt, choice = SHORT_ANSWER.format(question=question), {}
    else:
        raise BadRowError(f"question_type {kind!r} is neither multi-choice nor short-answer")
    groups = [f"{NAME}/{kind}"] + ([f"{NAME}/{row['category']}"] if row.get("category") else [])
    return EvalItem(text_cell(row, "id"), NAME, images, prompt, answer, options=choice, extra_groups=tuple(groups))


def read_mantis(root: Path, report: BadRecordReport, options: ImageOptions, cache_version: str | None = None
                ) -> list[EvalItem]:
    """The items of Mantis-Eval's test split under ``root``; bad rows go to ``report``, and the kept rows with surplus
    markers to its notes."""
    files = split_files(root, SPLIT, NAME, cache_version)
    notes: list[BadRecord] = []
    items = collect(table_rows(files, COLUMNS), lambda row, file, n: mantis_item(row, file, n, options, notes),
                    report, "id")
    kept = {(item.where, item.id) for item in items}
    for note in notes:
        if (f"{note.file}:{note.line}", note.id) in kept:
            report.note(note)
    return items

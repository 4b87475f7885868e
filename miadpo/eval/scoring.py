"""Scoring: greedy answers, VLMEvalKit's option-letter extraction, per-group accuracy and the markdown table.

Open answers are scored by normalised exact match (case, punctuation and spaces ignored; after a "Final Answer:"
the model was asked for, the text after it) — those with several accepted answers (MMMU's list literals) by MMMU's
own open-answer rule (``miadpo.eval.open_answers``) — multiple-choice ones by the option letter the answer names; groups
are format × N (single-image records form the group "single"), TSV and benchmark names and categories, and
circular groups. An optional error classifier (the toy world's: ``miadpo.toyworld.errors``) adds the share of each
class of wrong answer. ``evaluate`` decodes each batch's images only when it answers it: an item whose images
cannot be decoded, or whose prompt does not fit the model (``max_length``), is skipped, counted and listed.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from miadpo.data.images import ImageError, ImageOptions
from miadpo.data.pairs import BadRecordReport
from miadpo.eval.benchmarks import PAPER_AVERAGE
from miadpo.eval.items import EvalItem
from miadpo.eval.open_answers import open_answer_matches
from miadpo.models.base import ModelAdapter
from miadpo.models.samples import SampleTooLongError
from miadpo.text import markdown_table, normalise_answer

log = logging.getLogger(__name__)

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
ANSWER_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
ANSWER_IS = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([A-D])\**(?![A-Za-z])", re.IGNORECASE)
FINAL_ANSWER = re.compile(r"final answer\s*:", re.IGNORECASE)
POLARITY = {"yes": True, "true": True, "correct": True, "no": False, "false": False, "incorrect": False}
MEAN_ROW = "multi-image mean"
# A paper benchmark counts in the multi-image mean when this share of its published items was evaluated.
COVERED = 0.9


def option_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer picks, or None: VLMEvalKit's exact-matching extraction ``can_infer`` (read in
    open-compass/VLMEvalKit: vlmeval/utils/matching_util.py, and its use in vlmeval/dataset/utils/multiple_choice.py).

    1. A refusal ("Cannot determine the answer", "I can't process this file.", ...) picks nothing (VLMEvalKit's
       "Z"), with no text fallback.
    2. Letters: ``.()[],:;!*#{}`` become spaces and the answer is split on whitespace. If exactly one option letter
       is a token (case-sensitive: "b" alone is no letter) and its first occurrence is among the last four tokens,
       that is the option ("B", "(B) green", "Answer: B", "The answer is C"; not "A cat sits on the mat").
       With no option letter and a "Z" token it picks nothing.
    3. Else "answer is X" / "correct answer is **X**", any case, for X in A–D ("the answer is b." → B); unlike
       VLMEvalKit we require X to end the word, so "the answer is apple" is not A.
    4. Yes/no options (two options whose texts are yes/no or true/false, any case, as NLVR2's True/False): the
       first word of the answer if it says yes/true/correct or no/false/incorrect ("True.", "No, the left image
       ..." → the option of that polarity). Not in VLMEvalKit, which has no such benchmark.
    5. Else the option text: if the answer is at most twice the length of all option texts together, and exactly
       one option's text occurs in it (case ignored), that option.
    """
    letter = _letter_of(answer, list(options))
    if letter == "Z" and "Z" not in options:
        return None
    return letter or _polarity_option(answer, options) or _option_named(answer, options)


def _polarity_option(answer: str, options: dict[str, str]) -> str | None:
    polarities = {k: POLARITY.get(normalise_answer(v)) for k, v in options.items()}
    if len(options) != 2 or None in polarities.values() or len(set(polarities.values())) != 2:
        return None
    words = normalise_answer(answer).split()
    said = POLARITY.get(words[0]) if words else None
    return next((k for k, p in polarities.items() if p is said), None) if said is not None else None


def _letter_of(answer: str, letters: list[str]) -> str | None:
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    tokens = answer.translate(ANSWER_SEPARATORS).split()
    named = [k for k in letters if k in tokens]
    if len(named) == 1 and tokens.index(named[0]) >= len(tokens) - 4:
        return named[0]
    if not named and "Z" in tokens:
        return "Z"
    match = ANSWER_IS.search(answer)
    return match.group(1).upper() if match and match.group(1).upper() in letters else None


def _option_named(answer: str, options: dict[str, str]) -> str | None:
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(v) for v in options.values()):
        return None
    named = [k for k, v in options.items() if v.lower() in lowered]
    return named[0] if len(named) == 1 else None


def open_answer(prediction: str) -> str:
    """The answer of an open question: the text after the last "Final Answer:" if the model wrote one (Mantis-Eval's
    short-answer prompt asks for it), else the whole prediction."""
    parts = FINAL_ANSWER.split(prediction)
    return parts[-1].strip() if len(parts) > 1 else prediction


def is_correct(item: EvalItem, prediction: str) -> bool:
    """Whether ``prediction`` answers ``item``: by the option it picks, by MMMU's open-answer rule for ``accepted``
    answers, else by normalised exact match."""
    if item.options:
        return option_letter(prediction, item.options) == item.answer
    if item.accepted:
        return open_answer_matches(prediction, item.accepted)
    return normalise_answer(open_answer(prediction)) == normalise_answer(item.answer)


def circular_accuracy(pairs: Sequence[tuple[EvalItem, bool]]) -> tuple[int, float]:
    """Groups and their accuracy: a group (the rows sharing ``circular_group``) is right only if all its rows are;
    only groups holding their main row (index == group) count, as in VLMEvalKit's mcq_circular_eval."""
    rows: dict[str | None, list[bool]] = defaultdict(list)
    for item, ok in pairs:
        rows[item.circular_group].append(ok)
    mains = {item.circular_group for item, _ in pairs if item.id == item.circular_group}
    return len(mains), 100.0 * sum(all(rows[g]) for g in mains) / max(len(mains), 1)


class ErrorClassifier(Protocol):
    """Names the class of a wrong open answer (one of ``classes``), e.g. ``miadpo.toyworld.errors.ToyErrors``."""

    classes: tuple[str, ...]

    def __call__(self, item: EvalItem, prediction: str) -> str:
        """The class (one of ``classes``) of the wrong answer ``prediction`` to ``item``."""


def score(items: Sequence[EvalItem], predictions: Sequence[str], classify: ErrorClassifier | None = None
          ) -> dict[str, dict[str, float]]:
    """Per group: n, accuracy, and with ``classify`` the shares of wrong open answers by class (of all answers); with
    multi-image groups, a "multi-image mean" row (``multi_image_mean_row``: each group weighted equally, labelled
    when it covers only some of the paper's benchmarks). An item counts in
    its group and in its ``extra_groups``. Groups of circular items are scored per circular group: n groups,
    accuracy of groups, and "row accuracy" over all their rows (VLMEvalKit's "vanilla all")."""
    groups: dict[str, list[tuple[EvalItem, str]]] = defaultdict(list)
    for item, prediction in zip(items, predictions):
        for group in (item.group, *item.extra_groups):
            groups[group].append((item, prediction))
    table: dict[str, dict[str, float]] = {}
    for group, pairs in sorted(groups.items()):
        results, classes = [], defaultdict(int)
        for item, prediction in pairs:
            ok = is_correct(item, prediction)
            results.append((item, ok))
            if not ok and classify is not None and not item.options:
                classes[classify(item, prediction)] += 1
        correct = sum(ok for _, ok in results)
        if any(item.circular_group is not None for item, _ in results):
            n, accuracy = circular_accuracy(results)
            row = {"n": n, "accuracy": accuracy, "row accuracy": 100.0 * correct / len(pairs)}
        else:
            row = {"n": len(pairs), "accuracy": 100.0 * correct / len(pairs)}
        if classify is not None and not pairs[0][0].options:
            for name in classify.classes:
                row[f"{name} %"] = 100.0 * classes[name] / len(pairs)
        table[group] = row
    name, included = multi_image_mean_row({g: int(r["n"]) for g, r in table.items()}, published_counts(items))
    if included:
        table[name] = {"n": sum(table[g]["n"] for g in included),
                       "accuracy": sum(table[g]["accuracy"] for g in included) / len(included)}
    return table


def published_counts(items: Sequence[EvalItem]) -> dict[str, int]:
    """The published item count of each benchmark the items come from (``EvalItem.published``), by group."""
    return {item.group: item.published for item in items if item.published is not None}


def multi_image_mean_row(counts: dict[str, int], published: dict[str, int]) -> tuple[str, list[str]]:
    """The "multi-image mean" row's name and the groups it averages, from the units evaluated per group.

    A paper benchmark counts when at least ``COVERED`` (90%) of its published items were evaluated (``published``;
    one whose count is unknown counts when present); the format × N groups always count. When some paper benchmark
    is present but not all five count, the row is labelled with the ones it covers (``multi-image mean (mean of 3 of
    5: MMMU, BLINK, NLVR2)``) and a warning names the others and why."""
    def covered(group: str) -> bool:
        return group not in PAPER_AVERAGE or counts[group] >= COVERED * published.get(group, 0)

    included = [g for g in counts if in_multi_image_mean(g) and covered(g)]
    present = [g for g in PAPER_AVERAGE if g in counts]
    papers = [g for g in PAPER_AVERAGE if g in included]
    if not present or len(papers) == len(PAPER_AVERAGE):
        return MEAN_ROW, included
    left_out = [f"{g} (not evaluated)" if g not in counts else
                f"{g} ({counts[g]} of {published[g]} published items evaluated, under {COVERED:.0%})"
                for g in PAPER_AVERAGE if g not in papers]
    log.warning("the multi-image mean covers %d of the paper's %d benchmarks; left out: %s", len(papers),
                len(PAPER_AVERAGE), "; ".join(left_out))
    return f"{MEAN_ROW} (mean of {len(papers)} of {len(PAPER_AVERAGE)}: {', '.join(papers)})", included


def paired_units(items: Sequence[EvalItem], predictions: Sequence[str]) -> dict[str, dict[str, bool]]:
    """Per group, each unit's correctness, for a paired comparison (``miadpo.eval.compare``): units are items (by
    id; a repeated id is numbered ``id#2``, ...), or for a circular group the circular groups holding their main
    row (right only if all their rows are)."""
    units: dict[str, dict[str, bool]] = defaultdict(dict)
    circular: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    mains: dict[str, set[str]] = defaultdict(set)
    for item, prediction in zip(items, predictions):
        ok = is_correct(item, prediction)
        for group in (item.group, *item.extra_groups):
            if item.circular_group is not None:
                circular[group][item.circular_group].append(ok)
                if item.id == item.circular_group:
                    mains[group].add(item.id)
                continue
            unit, k = item.id, 1
            while unit in units[group]:
                k += 1
                unit = f"{item.id}#{k}"
            units[group][unit] = ok
    for group, rows in circular.items():
        units[group] = {g: all(rows[g]) for g in sorted(mains[group])}
    return dict(units)


def prompt_limit(adapter: ModelAdapter, max_length: int | None, max_new_tokens: int) -> int | None:
    """The most prompt tokens an item may take: ``max_length`` if set, else the model's context length
    (``max_position_embeddings`` of its text config) less the tokens it will generate; None if unknown."""
    if max_length is not None:
        return max_length
    config = adapter.model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = getattr(text_config, "max_position_embeddings", None)
    return None if context is None else int(context) - max_new_tokens


@dataclass
class Evaluation:
    """What ``evaluate`` gives: the table, the answered items and their predictions, and what it skipped."""

    table: dict[str, dict[str, float]]
    items: list[EvalItem]
    predictions: list[str]
    skipped: list[str] = field(default_factory=list)  # file:line (id): reason, of items not answered

    def correct(self) -> dict[str, dict[str, bool]]:
        """Each paired unit's correctness by group (``paired_units``), for ``miadpo.eval.compare``."""
        return paired_units(self.items, self.predictions)

    def keyed_predictions(self) -> dict[str, dict[str, str]]:
        """Each answer under its item's group (the benchmark, TSV or record group) and id, a repeated id numbered
        ``id#2``, ...: ids that repeat across benchmarks (every VLMEvalKit TSV counts from 0) keep every answer."""
        keyed: dict[str, dict[str, str]] = defaultdict(dict)
        for item, prediction in zip(self.items, self.predictions):
            unit, k = item.id, 1
            while unit in keyed[item.group]:
                k += 1
                unit = f"{item.id}#{k}"
            keyed[item.group][unit] = prediction
        return dict(keyed)


def evaluate(adapter: ModelAdapter, items: Sequence[EvalItem], batch_size: int = 16, max_new_tokens: int = 8,
             classify: ErrorClassifier | None = None, image_options: ImageOptions | None = None,
             report: BadRecordReport | None = None, max_length: int | None = None,
             progress: bool = False) -> Evaluation:
    """Greedy answers in batches of ``batch_size``, scored (``score``).

    Each batch's images are decoded when it is answered. An item whose image cannot be decoded goes to ``report``
    (skipped and counted, or raised, by its policy; without a report it raises); one whose prompt is longer than
    ``max_length`` tokens (image tokens included) is skipped and listed ("too long"), never cut."""
    adapter.model.eval()
    options = image_options or ImageOptions()
    answered: list[EvalItem] = []
    predictions: list[str] = []
    skipped: list[str] = []
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
        kept, prompts = [], []
        for item in items[start : start + batch_size]:
            try:
                prompts.append(adapter.encode(item.load_images(options), item.prompt, max_length=max_length))
            except ImageError as exc:
                bad = item.bad(str(exc))
                if report is None:
                    raise
                report.add(bad)
                skipped.append(str(bad))
                continue
            except SampleTooLongError as exc:
                skipped.append(str(item.bad(f"too long: {exc} (eval.max_length)")))
                continue
            kept.append(item)
        if prompts:
            predictions += adapter.generate_answers(prompts, max_new_tokens)
            answered += kept
    return Evaluation(score(answered, predictions, classify), answered, predictions, skipped)


def table_markdown(table: dict[str, dict[str, float]]) -> str:
    """A score table as markdown: per group n, accuracy, then the other columns in name order (0.0 where a group has
    none)."""
    columns = sorted({k for row in table.values() for k in row if k != "n"}, key=lambda k: (k != "accuracy", k))
    rows = ([group, int(row["n"]), *(f"{row.get(c, 0.0):.1f}" for c in columns)] for group, row in table.items())
    return markdown_table(["group", "n", *columns], rows) + "\n"


def in_multi_image_mean(group: str) -> bool:
    """Whether a group counts in the "multi-image mean" row: the format × N groups of augmented records, and the
    paper's multi-image benchmarks (its average over MMMU, BLINK, Mantis-Eval, NLVR2 and MVBench)."""
    return " N=" in group or group in PAPER_AVERAGE



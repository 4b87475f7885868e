"""MMMU's own rule for open answers (the MMMU authors' ``eval_open`` / ``parse_open_response``, read in
MMMU-Benchmark/MMMU ``eval/eval_utils.py``), for the open questions whose gold answer is a list of accepted answers.

1. Key parts of the prediction: it is stripped of spaces and a final ".", lower-cased and split into lines (the
   authors' sentence split never fires once the text is lower-cased, so only newlines split). In each line, for each
   indicator ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ", and "=" in the last
   line) the text after its last occurrence; the shortest of them is the line's key part, unless it is a bare
   punctuation mark. No key part at all: the whole prediction.
2. Candidates: the key parts and every number in them (plain, with thousands commas, or scientific).
3. Normalisation (candidates and gold answers alike): a text that reads as a number (commas ignored) becomes that
   number rounded to 2 decimals; any other text is lower-cased, and a one-character text becomes the two texts
   " x" and "x ".
4. Correct when a numeric candidate equals a numeric gold answer, or a gold text occurs inside a text candidate.
"""

from __future__ import annotations

import re

INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
PUNCTUATION_ONLY = frozenset({":", ",", ".", "!", "?", ";", "'"})
# The three kinds of number, collected in turn over the whole text (so "1,000" also gives "000" as a plain number).
NUMBER_KINDS = (re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # thousands commas
                re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific
                re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])"))  # plain

Normalised = float | str


def normalised(text: str) -> list[Normalised]:
    """Step 3: a number rounded to 2 decimals, or the lower-cased text (a single character padded both ways)."""
    text = text.strip()
    try:
        return [round(float(text.replace(",", "")), 2)]
    except ValueError:
        pass
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


def key_parts(prediction: str) -> list[str]:
    """Step 1: the shortest text after an indicator, per line."""
    text = prediction.strip().strip(".").lower()
    lines = text.split("\n")
    parts = []
    for index, line in enumerate(lines):
        indicators = INDICATORS + (("=",) if index == len(lines) - 1 else ())
        tails = [line.split(indicator)[-1].strip() for indicator in indicators if indicator in line]
        shortest = min(tails, key=len) if tails else ""
        if shortest and shortest not in PUNCTUATION_ONLY:
            parts.append(shortest)
    return parts or [text]


def candidates(prediction: str) -> set[Normalised]:
    """Steps 1–3 on a prediction."""
    parts = key_parts(prediction)
    found = parts + [number for part in parts for kind in NUMBER_KINDS for number in kind.findall(part)]
    return {value for text in found for value in normalised(text)}


def open_answer_matches(prediction: str, answers: tuple[str, ...]) -> bool:
    """Step 4: the prediction gives one of ``answers``."""
    gold = [value for answer in answers for value in normalised(answer)]
    for candidate in candidates(prediction):
        if isinstance(candidate, str):
            if any(isinstance(g, str) and g in candidate for g in gold):
                return True
        elif candidate in gold:
            return True
    return False

"""Selection and post-selection: candidates → DPO pairs. Cheap, so thresholds can be swept freely.

Selection (MIA-DPO's attention-aware selection, Liu et al. 2025): keep a candidate when its answer is wrong
(normalised comparison) and holds no image marker (nor does its ground truth: either would put an image token into
the labels), its attention ratio passes the per-format, per-N threshold with the format's operator, and its
perplexity is above the minimum. Post-selection (the paper's post-selection filters), each filter counted:
rejected-answer perplexity range, token length ratio len(rejected)/len(chosen) range, rapidfuzz edit similarity
between chosen and rejected bounds.
``selection.name=random`` ignores attention: among wrong answers that pass every other rule and filter, it
draws as many pairs per (format, N) as attention selection keeps — the ablation the paper did not publish.
With ``selection.right_answer_negatives``, right answers add pairs too (rejected: their extra answer), after the
same post-selection; both selection names keep them.
"""

from __future__ import annotations

import math
import operator
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rapidfuzz import fuzz

from miadpo.config import SelectionConfig, SelectionName
from miadpo.data.pairs import PairRecord
from miadpo.select.records import Candidate
from miadpo.text import image_marker_in, normalise_answer

OPERATORS: dict[str, Callable[[float, float], bool]] = {"<": operator.lt, "<=": operator.le}
KEPT = "kept"
# An image marker (<image>, <image-placeholder>) in an answer would become an image token in the labels.
IMAGE_MARKER_IN_ANSWER = "image marker in the generated answer"
IMAGE_MARKER_IN_GROUND_TRUTH = "image marker in the ground truth"


def edit_similarity(a: str, b: str) -> float:
    """Normalised Indel similarity in [0, 1] (rapidfuzz)."""
    return fuzz.ratio(a, b) / 100.0


def threshold_for(cfg: SelectionConfig, fmt: str, n_images: int) -> tuple[Callable[[float, float], bool], float]:
    """The attention rule of (``fmt``, N): its comparison (``selection.operators``) and threshold; ValueError naming
    the key when unset."""
    try:
        threshold = cfg.thresholds[fmt][n_images]
    except KeyError:
        raise ValueError(f"no attention threshold for {fmt} with N={n_images}: set "
                         f"selection.thresholds.{fmt}.{n_images}") from None
    symbol = cfg.operators.get(fmt, "<")
    if symbol not in OPERATORS:
        raise ValueError(f"selection.operators.{fmt} must be one of {sorted(OPERATORS)}, not {symbol!r}")
    return OPERATORS[symbol], float(threshold)


def rule_reason(candidate: Candidate, cfg: SelectionConfig, use_attention: bool) -> str:
    """Why the selection rule drops a candidate, or KEPT."""
    if not candidate.answer:
        return "empty answer"
    if image_marker_in(candidate.ground_truth) is not None:
        return IMAGE_MARKER_IN_GROUND_TRUTH
    if image_marker_in(candidate.answer) is not None:
        return IMAGE_MARKER_IN_ANSWER
    if candidate.correct:
        return "answer matches the ground truth"
    if not candidate.perplexity > cfg.min_perplexity:
        return f"perplexity <= {cfg.min_perplexity}"
    if use_attention:
        compare, threshold = threshold_for(cfg, candidate.format, candidate.n_images)
        if not compare(candidate.ratio, threshold):  # type: ignore[arg-type]  # a non-empty answer has a ratio
            return f"attention ratio not {cfg.operators.get(candidate.format, '<')} {threshold}"
    return KEPT


def _outside(value: float, low: float | None, high: float | None) -> bool:
    return (low is not None and value < low) or (high is not None and value > high)


def post_reason(candidate: Candidate, cfg: SelectionConfig) -> str:
    """Why post-selection drops a selected candidate, or KEPT (filters applied in this order)."""
    post = cfg.post
    if _outside(candidate.perplexity, post.perplexity_min, post.perplexity_max):
        return "post: perplexity out of range"
    ratio = candidate.answer_tokens / max(1, candidate.ground_truth_tokens)
    if _outside(ratio, post.length_ratio_min, post.length_ratio_max):
        return "post: length ratio out of range"
    similarity = edit_similarity(candidate.ground_truth, candidate.answer)
    if _outside(similarity, post.edit_similarity_min, post.edit_similarity_max):
        return "post: edit similarity out of range"
    return KEPT


def group_key(candidate: Candidate) -> tuple[str, int]:
    """(format, N): the group a candidate is counted and thresholded in."""
    return candidate.format, int(candidate.n_images)


def as_candidates(candidates: Iterable[Candidate | Mapping[str, Any]]) -> list[Candidate]:
    """Candidates, the ones given in their JSON form (a ``candidates.jsonl`` line) read with ``Candidate.from_json``."""
    return [Candidate.of(c) for c in candidates]


@dataclass
class Selection:
    """The selected pairs, one decision per candidate (kept, or why it was dropped) and the report."""

    pairs: list[PairRecord]
    decisions: list[dict[str, Any]]  # one per candidate: id and why it was dropped (or kept)
    report: dict[str, Any] = field(default_factory=dict)


def _decide(candidates: Sequence[Candidate], cfg: SelectionConfig, use_attention: bool) -> list[str]:
    reasons = []
    for candidate in candidates:
        reason = rule_reason(candidate, cfg, use_attention)
        reasons.append(post_reason(candidate, cfg) if reason == KEPT else reason)
    return reasons


def _decision(record_id: str, candidate: Candidate, ratio: float | None, perplexity: float,
              reason: str) -> dict[str, Any]:
    """One line of the selection's decision log."""
    return {"id": record_id, "format": candidate.format, "n_images": candidate.n_images, "ratio": ratio,
            "perplexity": perplexity, "decision": reason}


def _pair(pair_id: str, candidate: Candidate, rejected: str, meta: dict[str, Any]) -> PairRecord:
    """The pair of a candidate: chosen = its ground truth, ``rejected`` as given, the candidate's layout in meta."""
    return PairRecord(id=pair_id, images=list(candidate.images), prompt=candidate.prompt,
                      chosen=candidate.ground_truth, rejected=rejected,
                      meta={"format": candidate.format, "n_images": candidate.n_images,
                            "target": candidate.target, **meta, "layer": candidate.layer},
                      rejected_images=candidate.rejected_images)


def select_pairs(candidates: Iterable[Candidate | Mapping[str, Any]], cfg: SelectionConfig, seed: int) -> Selection:
    """Apply the configured selection and post-selection to candidates (in their order; dicts: their JSON form)."""
    candidates = as_candidates(candidates)
    attention_reasons = _decide(candidates, cfg, use_attention=True)
    if SelectionName(cfg.name) is SelectionName.attention:
        reasons = attention_reasons
    else:  # random: as many wrong answers per group as attention keeps, drawn without looking at attention
        wanted = Counter(group_key(c) for c, r in zip(candidates, attention_reasons) if r == KEPT)
        blind = _decide(candidates, cfg, use_attention=False)
        pools: dict[tuple[str, int], list[int]] = defaultdict(list)
        for index, (candidate, reason) in enumerate(zip(candidates, blind)):
            if reason == KEPT:
                pools[group_key(candidate)].append(index)
        rng = random.Random(seed)
        chosen: set[int] = set()
        for key in sorted(pools):
            chosen.update(rng.sample(pools[key], min(wanted[key], len(pools[key]))))
        reasons = [KEPT if i in chosen else (r if r != KEPT else "random: not drawn") for i, r in enumerate(blind)]

    pairs, decisions = [], []
    right = right_answer_pairs(candidates, cfg)
    for candidate, reason in zip(candidates, reasons):
        decisions.append(_decision(candidate.id, candidate, candidate.ratio, candidate.perplexity, reason))
        if reason == KEPT:
            pairs.append(_pair(candidate.id, candidate, candidate.answer,
                               {"selection": cfg.name, "attention_ratio": candidate.ratio,
                                "image_scores": candidate.image_scores, "perplexity": candidate.perplexity}))
    for pair, decision in right:
        decisions.append(decision)
        if pair is not None:
            pairs.append(pair)
    reasons = reasons + [decision["decision"] for _, decision in right]
    report = {
        "selection": cfg.name,
        "candidates": len(candidates),
        "pairs": len(pairs),
        "dropped": dict(Counter(r for r in reasons if r != KEPT)),
        "pairs_by_format": {f"{fmt} N={n}": count for (fmt, n), count in
                            sorted(Counter((p.meta["format"], int(p.meta["n_images"])) for p in pairs).items())},
        "right_answer_pairs": sum(1 for pair, _ in right if pair is not None),
    }
    return Selection(pairs, decisions, report)


def calibrate_thresholds(candidates: Iterable[Candidate | Mapping[str, Any]], cfg: SelectionConfig,
                         removed_share: float) -> dict[str, dict[int, float]]:
    """Per (format, N) thresholds under which the attention rule removes ``removed_share`` of the wrong answers.

    The reference thresholds were set for LLaVA-1.5's attention; another model spreads its attention otherwise
    (a small model's ratios sit near 1/N, where 0.8 / 0.7 / 0.6 remove almost nothing). Among the wrong answers
    that pass the other rules, the threshold is their ratio quantile at 1 − ``removed_share`` (read with the
    format's operator), so the wrong answers that looked hardest at the target image are the ones removed.
    Calibrate on candidates that are not the evaluation split (dicts: their JSON form).
    """
    if not 0 <= removed_share < 1:
        raise ValueError(f"removed_share must be in [0, 1), got {removed_share}")
    ratios: dict[tuple[str, int], list[float]] = defaultdict(list)
    for candidate in as_candidates(candidates):
        if rule_reason(candidate, cfg, use_attention=False) == KEPT and candidate.ratio is not None:
            ratios[group_key(candidate)].append(float(candidate.ratio))
    thresholds: dict[str, dict[int, float]] = defaultdict(dict)
    for (fmt, n), values in sorted(ratios.items()):
        values.sort()
        keep = len(values) - round(removed_share * len(values))  # wrong answers kept: the lowest ratios
        if keep >= len(values):
            thresholds[fmt][n] = values[-1] if cfg.operators.get(fmt, "<") == "<=" else math.nextafter(values[-1], 2)
        elif cfg.operators.get(fmt, "<") == "<=":
            thresholds[fmt][n] = values[keep - 1] if keep else math.nextafter(values[0], -1)
        else:
            thresholds[fmt][n] = values[keep]
    return {fmt: dict(by_n) for fmt, by_n in thresholds.items()}


def right_answer_pairs(candidates: Sequence[Candidate], cfg: SelectionConfig
                       ) -> list[tuple[PairRecord | None, dict[str, Any]]]:
    """Pairs from right answers (``selection.right_answer_negatives``): chosen = the ground truth, rejected = the
    extra answer (about another image, or the runner-up) when it differs; post-selection applies as to the others."""
    out: list[tuple[PairRecord | None, dict[str, Any]]] = []
    for candidate in candidates:
        other = candidate.negative
        if other is None:
            continue
        if not other.answer:
            reason = f"{other.kind}: empty answer"
        elif image_marker_in(candidate.ground_truth) is not None:
            reason = f"{other.kind}: {IMAGE_MARKER_IN_GROUND_TRUTH}"
        elif image_marker_in(other.answer) is not None:
            reason = f"{other.kind}: {IMAGE_MARKER_IN_ANSWER}"
        elif normalise_answer(other.answer) == normalise_answer(candidate.ground_truth):
            reason = f"{other.kind}: same as the ground truth"
        else:
            reason = post_reason(replace(candidate, answer=other.answer, answer_tokens=other.answer_tokens,
                                         perplexity=other.perplexity), cfg)
        pair_id = f"{candidate.id}-{other.kind}"
        pair = None
        if reason == KEPT:
            pair = _pair(pair_id, candidate, other.answer,
                         {"selection": other.kind, "asked_about": other.asked_about, "attention_ratio": None,
                          "perplexity": other.perplexity})
        out.append((pair, _decision(pair_id, candidate, None, other.perplexity, reason)))
    return out


def report_text(report: dict[str, Any]) -> str:
    """The selection report as the text of ``report.txt``."""
    lines = [f"selection: {report['selection']}", f"candidates: {report['candidates']}", f"pairs: {report['pairs']}"]
    if report.get("right_answer_pairs"):
        lines.append(f"  of which from right answers (selection.right_answer_negatives): "
                     f"{report['right_answer_pairs']}")
    lines += [f"  {key}: {count}" for key, count in report["pairs_by_format"].items()]
    lines.append("dropped:")
    lines += [f"  {reason}: {count}" for reason, count in sorted(report["dropped"].items())]
    return "\n".join(lines) + "\n"


def to_trl(pair: PairRecord, image_paths: Sequence[str], rejected_paths: Sequence[str] | None = None
           ) -> dict[str, Any]:
    """TRL's conversational vision preference format (DPOTrainer with a processor). A pair's image-side negative goes
    in an extra ``rejected_images`` column (ms-swift's name; TRL's DPOTrainer does not read it)."""
    content: list[dict[str, Any]] = []
    for index, piece in enumerate(pair.prompt.split("<image>")):
        if index:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    row = {
        "id": pair.id,
        "images": list(image_paths),
        "prompt": [{"role": "user", "content": content}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": pair.chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": pair.rejected}]}],
    }
    return row if rejected_paths is None else {**row, "rejected_images": list(rejected_paths)}


def to_llamafactory(pair: PairRecord, image_paths: Sequence[str], rejected_paths: Sequence[str] | None = None
                    ) -> dict[str, Any]:
    """LLaMA-Factory's sharegpt preference format (``ranking: true``); an image-side negative goes in an extra
    ``rejected_images`` key, outside ``dataset_info.json``'s columns (LLaMA-Factory has no column for it)."""
    row = {
        "conversations": [{"from": "human", "value": pair.prompt}],
        "chosen": {"from": "gpt", "value": pair.chosen},
        "rejected": {"from": "gpt", "value": pair.rejected},
        "images": list(image_paths),
    }
    return row if rejected_paths is None else {**row, "rejected_images": list(rejected_paths)}


LLAMAFACTORY_DATASET_INFO = {
    "formatting": "sharegpt",
    "ranking": True,
    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"},
}

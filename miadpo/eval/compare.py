"""Paired comparison of two evaluations on the same items: accuracy difference, bootstrap interval, McNemar test.

Two models answered the same items; per item each was right or wrong. For a benchmark with ``n`` paired units
(items; circular groups for circular benchmarks) and correctness vectors ``a`` (before / the other evaluation) and
``b`` (after / this one):

    Δ = 100 · (mean(b) − mean(a))
    95% interval: the 2.5th and 97.5th percentiles of Δ over ``resamples`` paired bootstrap replicates (n units
        drawn with replacement, the same draw for a and b, so the pairing is kept)
    McNemar exact p-value: with n₁₀ units right only in a and n₀₁ right only in b,
        p = min(1, 2 · P[X ≤ min(n₁₀, n₀₁)]),  X ~ Binomial(n₁₀ + n₀₁, ½);  p = 1 without discordant units

The "multi-image mean" row (the groups of ``scoring.multi_image_mean_row``, weighted equally; labelled when it
covers only some of the paper's benchmarks) takes the mean of the groups' Δ, its interval from the same replicates
(each group resampled on its own); it has no McNemar test. A unit in only one of the two evaluations (an item
skipped in one of them) is left out of that benchmark's comparison and counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np

from miadpo.eval.scoring import multi_image_mean_row
from miadpo.text import markdown_table


@dataclass(frozen=True)
class PairedDifference:
    """One benchmark's (group's) paired comparison: accuracies in percent, Δ = b − a, its 95% interval."""

    n: int
    accuracy_a: float
    accuracy_b: float
    delta: float
    low: float
    high: float
    mcnemar_p: float | None
    unpaired: int = 0  # units in only one of the two evaluations, left out

    def as_dict(self) -> dict[str, float | int | None]:
        """The fields as a dict (for JSON)."""
        return asdict(self)

    def interval(self) -> str:
        """The 95% interval as text, ``[low, high]`` signed to one decimal."""
        return f"[{self.low:+.1f}, {self.high:+.1f}]"


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts (binomial test of ``only_b`` in ``only_a +
    only_b`` at ½)."""
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def _replicates(a: np.ndarray, b: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Δ (percent) of ``resamples`` paired bootstrap replicates."""
    draws = rng.integers(0, len(a), size=(resamples, len(a)))
    return 100.0 * (b[draws].mean(axis=1) - a[draws].mean(axis=1))


def compare_correctness(a: Mapping[str, Mapping[str, bool]], b: Mapping[str, Mapping[str, bool]],
                        resamples: int = 10_000, seed: int = 0, published: Mapping[str, int] | None = None
                        ) -> dict[str, PairedDifference]:
    """Per group present in both: the paired difference of ``b`` against ``a`` (group → unit id → right).

    Groups are compared in sorted order from one seeded generator, so the result is the same on every run. The mean
    row covers the groups ``scoring.multi_image_mean_row`` counts given the paired units and ``published`` (the
    benchmarks' published item counts), labelled when it covers only some of the paper's benchmarks."""
    rng = np.random.default_rng(seed)
    table: dict[str, PairedDifference] = {}
    replicates_of: dict[str, np.ndarray] = {}
    for group in sorted(set(a) & set(b)):
        shared = sorted(set(a[group]) & set(b[group]))
        unpaired = len(set(a[group]) ^ set(b[group]))
        if not shared:
            continue
        right_a = np.array([a[group][u] for u in shared], dtype=float)
        right_b = np.array([b[group][u] for u in shared], dtype=float)
        replicates = _replicates(right_a, right_b, resamples, rng)
        low, high = np.percentile(replicates, [2.5, 97.5])
        only_a = int(((right_a == 1) & (right_b == 0)).sum())
        only_b = int(((right_a == 0) & (right_b == 1)).sum())
        row = PairedDifference(len(shared), 100.0 * right_a.mean(), 100.0 * right_b.mean(),
                               100.0 * (right_b.mean() - right_a.mean()), float(low), float(high),
                               mcnemar_p(only_a, only_b), unpaired)
        table[group] = row
        replicates_of[group] = replicates
    name, included = multi_image_mean_row({g: r.n for g, r in table.items()}, dict(published or {}))
    if included:
        mean_groups = [table[g] for g in included]
        replicates = np.mean([replicates_of[g] for g in included], axis=0)
        low, high = np.percentile(replicates, [2.5, 97.5])
        count = len(mean_groups)
        table[name] = PairedDifference(
            sum(r.n for r in mean_groups), sum(r.accuracy_a for r in mean_groups) / count,
            sum(r.accuracy_b for r in mean_groups) / count, sum(r.delta for r in mean_groups) / count,
            float(low), float(high), None, sum(r.unpaired for r in mean_groups))
    return table


def comparison_markdown(table: Mapping[str, PairedDifference], a: str = "a", b: str = "b") -> str:
    """One row per group: n, the two accuracies, Δ, its 95% interval and the McNemar p-value."""
    rows = [[group, row.n, f"{row.accuracy_a:.1f}", f"{row.accuracy_b:.1f}", f"{row.delta:+.1f}", row.interval(),
             "" if row.mcnemar_p is None else f"{row.mcnemar_p:.3g}"] for group, row in table.items()]
    header = ["group", "n", a, b, "Δ", "95% CI (paired bootstrap)", "McNemar p"]
    return markdown_table(header, rows) + "\n"

"""Attention thresholds calibrated on a model's own candidates.

    python -m miadpo.select.calibrate <selection dir>/candidates.jsonl --remove 0.3 [--operator-sequence "<="]

Prints, per format and N, the threshold under which the attention rule removes that share of the wrong answers
(``miadpo.select.rules.calibrate_thresholds``), with the ratio quantiles of right and wrong answers, as Hydra
overrides and as YAML for a recipe's ``selection.thresholds``. Use candidates of a split you do not evaluate on.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from miadpo.config import SelectionConfig
from miadpo.select.records import read_candidates
from miadpo.select.rules import calibrate_thresholds, group_key


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


def threshold_overrides(thresholds: dict[str, dict[int, float]]) -> list[str]:
    """The thresholds as command-line overrides (``selection.thresholds.grid.4=0.4000``), which compose."""
    return [f"selection.thresholds.{fmt}.{n}={t:.4f}" for fmt, by_n in thresholds.items() for n, t in by_n.items()]


def main(argv: list[str] | None = None) -> None:
    """The command line: thresholds from a candidates file, printed as overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidates", type=Path)
    parser.add_argument("--remove", type=float, required=True, help="share of wrong answers the rule removes")
    parser.add_argument("--min-perplexity", type=float, default=SelectionConfig.min_perplexity)
    args = parser.parse_args(argv)
    if not args.candidates.is_file():
        parser.error(f"{args.candidates}: no such candidates file")
    candidates = read_candidates(args.candidates)
    cfg = OmegaConf.structured(SelectionConfig(min_perplexity=args.min_perplexity))
    thresholds = calibrate_thresholds(candidates, cfg, args.remove)  # type: ignore[arg-type]
    for fmt, by_n in thresholds.items():
        for n, threshold in by_n.items():
            group = [c for c in candidates if group_key(c) == (fmt, n) and c.ratio is not None]
            right = [c.ratio for c in group if c.correct]
            wrong = [c.ratio for c in group if not c.correct and c.answer]
            print(f"{fmt} N={n}: threshold {threshold:.4f}; median ratio right {_median(right)} ({len(right)}), "
                  f"wrong {_median(wrong)} ({len(wrong)})")
    print("overrides: " + " ".join(threshold_overrides(thresholds)))
    print(OmegaConf.to_yaml({"selection": {"thresholds": {f: {n: round(t, 4) for n, t in b.items()}
                                                          for f, b in thresholds.items()}}}))


if __name__ == "__main__":
    main()

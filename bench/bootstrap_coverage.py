"""How often does site_validation's 95 % bootstrap interval hold the cmAP5 that N windows of the site give
on average? A simulated site where that value is known.

    python bench/bootstrap_coverage.py [--windows 50 150 400] [--draws 150] [--rounds 300]

A population of 20 000 windows, 10 species calling in 1-6 % of them, scores 0.25 higher on a window with the
call plus noise (a middling model). Each draw labels N windows at random, as review.py's random share does;
its padded cmAP5 and percentile bootstrap interval are those report.py --site-labels prints. Coverage: the
share of draws whose interval holds the mean cmAP5 over all draws of N windows (padded cmAP5 depends on N,
so the mean at N, not the population's value, is the target). Also printed: the bootstrap's mean shift
(resamples' mean minus the draw's value: resampling repeats rows, and a rare species whose positives a
resample misses keeps only the padding rows, AP 1) and the interval's width against the true spread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import site_validation  # noqa: E402

PREVALENCE = np.array([0.02, 0.03, 0.05, 0.01, 0.04, 0.02, 0.06, 0.015, 0.03, 0.025])     # per species


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[50, 150, 400], help="labelled windows N")
    parser.add_argument("--draws", type=int, default=150, help="labelled sets drawn per N")
    parser.add_argument("--rounds", type=int, default=300, help="bootstrap resamplings per set")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    targets = (rng.random((20_000, len(PREVALENCE))) < PREVALENCE).astype(np.int64)          # (windows, species)
    scores = np.clip(0.25 * targets + 0.6 * rng.random(targets.shape) ** 2, 0, 1)
    print("| labelled windows | mean cmAP5 | its spread (sd) | coverage of the 95 % interval | mean shift "
          "of the resamples | interval width (4 sd would be) |\n|---|---|---|---|---|---|")
    for windows in args.windows:
        results = []
        for draw in range(args.draws):
            rows = rng.choice(len(targets), windows, replace=False)
            results.append(site_validation.bootstrap_cmap5(targets[rows], scores[rows], rounds=args.rounds, seed=draw))
        values = np.array([result["site_cmap5"] for result in results])
        target = values.mean()
        coverage = np.mean([result["low"] <= target <= result["high"] for result in results])
        shift = np.mean([result["resampled"].mean() - result["site_cmap5"] for result in results])
        width = np.mean([result["high"] - result["low"] for result in results])
        print(f"| {windows} | {target:.3f} | {values.std():.3f} | {coverage:.2f} | {shift:+.3f} | "
              f"{width:.3f} ({4 * values.std():.3f}) |", flush=True)


if __name__ == "__main__":
    main()

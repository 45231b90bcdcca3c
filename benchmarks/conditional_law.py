"""Do per-class memorization onsets follow the paper's law applied per class, tau_mem proportional to n_class?

Reads the ``summary.json`` of a ``memwatch demo --conditional`` run and fits tau_mem(class) = slope * n_class over
every flagged class of every run (n_class: that class's training digits in that run), with
:func:`lightning_memwatch.fits.fit_tau_mem` (through the origin, with an intercept, and the log-log exponent).
Classes never flagged before the run stopped are censored (their onset lies after the stop): they are listed,
not fitted.

Run: ``memwatch demo --quick --conditional --n 16 32 64 128 --out runs/demo_cond`` then
``python benchmarks/conditional_law.py runs/demo_cond/summary.json``.
"""

from __future__ import annotations

import argparse
import json

from lightning_memwatch.fits import TooFewRunsError, fit_tau_mem


def points(summary: dict) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int]]]:
    """``(n, class, n_class, onset)`` of each flagged class, and ``(n, class, n_class)`` of the censored ones."""
    flagged, censored = [], []
    for run in summary["demo"]["runs"]:
        onsets = {int(k): int(v) for k, v in run.get("class_tau_mem", {}).items()}
        for label, size in sorted((int(k), int(v)) for k, v in run.get("class_sizes", {}).items()):
            if label in onsets:
                flagged.append((run["n"], label, size, onsets[label]))
            else:
                censored.append((run["n"], label, size))
    return flagged, censored


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="summary.json of a `memwatch demo --conditional` run")
    args = parser.parse_args(argv)
    with open(args.summary) as fh:
        flagged, censored = points(json.load(fh))
    for n, label, size, onset in flagged:
        print(f"n={n}: class {label} ({size} training digits) flagged at step {onset} ({onset / size:.1f} steps/digit)")
    print(f"{len(censored)} class(es) not flagged before their run stopped (censored): "
          + ", ".join(f"n={n} class {k} ({s})" for n, k, s in censored))  # fmt: skip
    try:
        fit = fit_tau_mem([p[2] for p in flagged], [p[3] for p in flagged])
    except TooFewRunsError as err:
        print(f"no fit: {err}")
        return 0
    print(
        f"fit over {fit.num_runs} flagged classes: tau_mem = {fit.origin.slope:.1f} * n_class (through the origin), "
        f"R^2 = {fit.origin.r2:.3f}; with an intercept: {fit.affine.intercept:.1f} + {fit.affine.slope:.1f} * "
        f"n_class, R^2 = {fit.affine.r2:.3f}; log-log exponent {fit.exponent:.2f} (1 = linear)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

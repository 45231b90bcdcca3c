"""Do per-class memorization onsets follow the paper's law applied per class, tau_mem proportional to n_class?

Reads the ``summary.json`` of a ``memwatch demo --conditional`` run and fits tau_mem(class) = slope * n_class over
every flagged class of every run (n_class: that class's training digits in that run), with
:func:`lightning_memwatch.fits.fit_tau_mem` (through the origin, with an intercept, and the log-log exponent).
Classes never flagged before the run stopped are censored (their onset lies after the stop): they are listed,
not fitted.

Run: ``memwatch demo --quick --conditional --n 16 32 64 128 --out runs/demo_cond`` then
``python benchmarks/conditional_law.py runs/demo_cond/summary.json``; ``--json out.json`` also writes the points, the
fit and, per run, whether the global stopper's restored step came before every flagged class onset.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i : j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation of x and y (None with fewer than 3 points or a constant side)."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def restored_before_onsets(summary: dict) -> list[dict]:
    """Per run: the global stop, the restored step, the earliest flagged class onset and whether restored < it."""
    rows = []
    for run in summary["demo"]["runs"]:
        onsets = [int(v) for v in run.get("class_tau_mem", {}).values()]
        restored, first = run.get("restored_step"), (min(onsets) if onsets else None)
        before = None if first is None else (restored is not None and restored < first)
        sizes = {int(k): int(v) for k, v in run.get("class_sizes", {}).items()}
        pairs = [(sizes[int(k)], int(v)) for k, v in run.get("class_tau_mem", {}).items()]
        rho = spearman([float(a) for a, _ in pairs], [float(b) for _, b in pairs])
        rows.append({"n": run["n"], "steps": run["steps"], "tau_mem_online": run.get("tau_mem_online"),
                     "restored_step": restored, "first_class_onset": first, "restored_before_every_onset": before,
                     "within_run_spearman": rho})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", help="summary.json of a `memwatch demo --conditional` run")
    parser.add_argument("--json", help="also write the points, the fit and the restored-step check here")
    args = parser.parse_args(argv)
    with open(args.summary) as fh:
        summary = json.load(fh)
    flagged, censored = points(summary)
    restored = restored_before_onsets(summary)
    for row in restored:
        print(f"n={row['n']}: global tau_mem {row['tau_mem_online']}, restored step {row['restored_step']}, "
              f"first class onset {row['first_class_onset']}: restored before every class onset: "
              f"{row['restored_before_every_onset']}; within the run, Spearman(n_class, onset) over its flagged "
              f"classes: {'-' if row['within_run_spearman'] is None else format(row['within_run_spearman'], '.2f')}")
    for n, label, size, onset in flagged:
        print(f"n={n}: class {label} ({size} training digits) flagged at step {onset} ({onset / size:.1f} steps/digit)")
    print(f"{len(censored)} class(es) not flagged before their run stopped (censored): "
          + ", ".join(f"n={n} class {k} ({s})" for n, k, s in censored))  # fmt: skip
    record: dict = {
        "summary": args.summary,
        "demo_settings": summary["demo"].get("settings"),
        "demo_wall_seconds": summary["demo"].get("wall_seconds"),
        "flagged": [dict(zip(("n", "label", "n_class", "onset"), p, strict=True)) for p in flagged],
        "censored": [dict(zip(("n", "label", "n_class"), p, strict=True)) for p in censored],
        "runs": restored,
        "fit": None,
    }
    try:
        fit = fit_tau_mem([p[2] for p in flagged], [p[3] for p in flagged])
    except TooFewRunsError as err:
        print(f"no fit: {err}")
        fit = None
    if fit is not None:
        record["fit"] = {**dataclasses.asdict(fit), "exponent": fit.exponent}
        # the same onsets against the whole run's n: does the class's own size explain more than the run's?
        by_n = fit_tau_mem([p[0] for p in flagged], [p[3] for p in flagged])
        record["fit_against_run_n"] = {**dataclasses.asdict(by_n), "exponent": by_n.exponent}
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(record, indent=1) + "\n")
    if fit is None:
        return 0
    print(
        f"fit over {fit.num_runs} flagged classes: tau_mem = {fit.origin.slope:.1f} * n_class (through the origin), "
        f"R^2 = {fit.origin.r2:.3f}; with an intercept: {fit.affine.intercept:.1f} + {fit.affine.slope:.1f} * "
        f"n_class, R^2 = {fit.affine.r2:.3f}; log-log exponent {fit.exponent:.2f} (1 = linear)"
    )
    by_n = record["fit_against_run_n"]
    print(
        f"the same onsets against the run's n: tau_mem = {by_n['origin']['slope']:.2f} * n, "
        f"R^2 = {by_n['origin']['r2']:.3f}; log-log exponent {by_n['exponent']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

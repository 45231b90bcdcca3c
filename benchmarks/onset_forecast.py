"""How well the onset forecast (lightning_memwatch.onset) forecasts the step at which f_mem leaves zero.

Two steps::

    # 1. the demo's runs, exactly `memwatch demo`'s pieces (apps.demo.train_one), with every MemWatch record kept
    #    (ratio quantiles and the live forecast included), one JSON per (seed, n):
    python benchmarks/onset_forecast.py run --seed 0 --n 64 128 256 512 --out runs/onset
    python benchmarks/onset_forecast.py run --seed 1 --n 64 128 256 512 --out runs/onset
    python benchmarks/onset_forecast.py run --quick --seed 0 --out runs/onset    # the quick demo's n = 8, 16, 32
    # 2. replay the forecast on the kept histories (a pure function of them) and tabulate its error:
    python benchmarks/onset_forecast.py analyze --out runs/onset

For each run: the detector's tau_mem (the demo's rule: the first evaluation with f_mem > f0 = 3%, which the
forecast targets: MemWatch forecasts the step at which f_mem exceeds the detector's f0), and the forecast made
at the evaluations nearest 1/2 and 3/4 of tau_mem, with its relative error ``(forecast - tau_mem) / tau_mem``
and whether tau_mem lies in the forecast's interval. The first evaluation with f_mem > 0 is listed too.

``analyze`` also reads the JSON rows of ``benchmarks/zoo.py --json`` (the zoo's default detector: rule "ci",
f0 = 0, 1000 samples: the forecast aims at the f_mem where that rule holds, ``onset.detector_level``); rows
run with ``zoo.py --every N`` are named "SETUP every N".
The table goes to docs/onset_forecast.md; the JSON summary to ``benchmarks/results/onset_forecast.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any


def run(seed: int, ns: list[int] | None, out: Path, quick: bool) -> None:
    import torch

    import lightning_memwatch
    from lightning_memwatch.apps import demo

    captured: dict[str, Any] = {}

    class KeepingHistory(lightning_memwatch.MemWatch):  # the demo's MemWatch, its records kept at the end
        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            captured["history"] = [r.to_dict() for r in self.history]
            captured["tau_mem"] = self.tau_mem
            captured["tau_gen"] = self.tau_gen

    lightning_memwatch.MemWatch = KeepingHistory  # train_one imports it from the package at call time
    overrides: dict[str, Any] = {"seed": seed, "log_images": False, "plots": False, "workers": 1}
    if ns:
        overrides["ns"] = tuple(ns)
    config = demo.DemoConfig.quick(**overrides) if quick else demo.DemoConfig(**overrides)
    config = demo.DemoConfig(**{**config.to_dict(), "out": out / f"demo_{'quick_' if quick else ''}s{seed}",
                                "ns": tuple(config.ns)})  # fmt: skip
    torch.set_num_threads(1)
    net, _ = demo._prepare_classifier(config)
    for n in sorted(config.ns):
        start = time.perf_counter()
        result = demo.train_one(config, n, net.state_dict())
        name = f"{'quick_' if quick else ''}s{seed}_n{n}.json"
        record = {"setup": "demo-quick" if quick else "demo", "seed": seed, "n": n, "result": result,
                  "level": config.mem_threshold, "threshold": 1 / 3,
                  "eval_every": config.eval_period(n), "wall_seconds": time.perf_counter() - start, **captured}
        out.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name}: tau_mem={captured['tau_mem']} evaluations={len(captured['history'])}", flush=True)


def _nearest(history: list[dict], target: float, before: int) -> dict | None:
    candidates = [r for r in history if r["step"] < before]
    return min(candidates, key=lambda r: abs(r["step"] - target)) if candidates else None


def analyze_one(run_data: dict) -> dict[str, Any]:
    from lightning_memwatch.onset import forecast_onset

    history = run_data["history"]
    tau_mem = run_data.get("tau_mem")
    level = float(run_data.get("level", 0.0))
    first_copy = next((r["step"] for r in history if r["f_mem"] > 0), None)
    row: dict[str, Any] = {"setup": run_data["setup"], "seed": run_data.get("seed"), "n": run_data.get("n"),
                           "tau_mem": tau_mem, "first_copy": first_copy, "level": level,
                           "eval_every": run_data.get("eval_every")}  # fmt: skip
    if tau_mem is None:
        return row
    row["evaluations_before"] = sum(r["step"] < tau_mem for r in history)
    onset = tau_mem
    for share in (0.5, 0.75):
        at = _nearest(history, share * tau_mem, before=onset)
        key = f"at_{int(share * 100)}"
        if at is None:
            row[key] = None
            continue
        past = [r for r in history if r["step"] <= at["step"]]
        forecast = forecast_onset(past, threshold=float(run_data.get("threshold", 1 / 3)), level=level)
        entry: dict[str, Any] = {"step": at["step"], "evaluations": len(past), "forecast": forecast.step,
                                 "low": forecast.low, "high": forecast.high, "reason": forecast.reason}  # fmt: skip
        if forecast.step is not None:
            entry["error"] = (forecast.step - onset) / onset
            entry["in_interval"] = forecast.low <= onset <= (forecast.high if forecast.high is not None else 1e18)
        row[key] = entry
    return row


def analyze(out: Path) -> dict[str, Any]:
    from lightning_memwatch.onset import detector_level

    runs = []
    for path in sorted(out.glob("*.json")):
        if path.name == "analysis.json":
            continue
        data = json.loads(path.read_text())
        if isinstance(data, list):  # benchmarks/zoo.py rows: the default detector (f0 = 0)
            runs += [{"setup": row["setup"] + (f" every {row['every']}" if row.get("every") else ""), "seed": 0,
                      "n": row["n"], "history": row["history"], "tau_mem": row["tau_mem"],
                      "level": detector_level("ci", 0.0, 1000), "eval_every": row.get("every") or "auto"}
                     for row in data]  # fmt: skip
        else:
            runs.append(data)
    rows = [analyze_one(r) for r in runs]
    at75 = [r["at_75"] for r in rows if r.get("at_75")]
    within = [e for e in at75 if e.get("error") is not None and abs(e["error"]) <= 0.25]
    summary = {
        "runs": len(rows),
        "with_forecast_at_75": sum(e.get("forecast") is not None for e in at75),
        "within_25pct_at_75": len(within),
        "rows": rows,
    }
    (out / "analysis.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{'setup':<11}{'seed':>5}{'n':>6}{'1st copy':>9}{'tau_mem':>8} | {'at':>6}{'forecast':>9}{'error':>8}  "
          f"{'interval':<15}| {'at':>6}{'forecast':>9}{'error':>8}  interval")  # fmt: skip
    for r in rows:
        cells = []
        for key in ("at_50", "at_75"):
            e = r.get(key)
            if not e:
                cells.append(f"{'-':>6}{'-':>9}{'-':>8}  {'':<15}")
                continue
            if e["forecast"] is None:
                cells.append(f"{e['step']:>6}{'none':>9}{'-':>8}  {'':<15}")
                continue
            high = "open" if e["high"] is None else f"{e['high']:.0f}"
            interval = f"[{e['low']:.0f}, {high}]" + ("" if e["in_interval"] else " x")
            cells.append(f"{e['step']:>6}{e['forecast']:>9.0f}{100 * e['error']:>+7.0f}%  {interval:<15}")
        print(f"{r['setup']:<11}{str(r['seed']):>5}{str(r['n']):>6}{str(r['first_copy']):>9}{str(r['tau_mem']):>8} | "
              + "| ".join(cells))
    print(f"within 25% at 3/4 of tau_mem: {len(within)} of {len(rows)} runs "
          f"({summary['with_forecast_at_75']} with a forecast there)")
    return summary


def probe_signals(paths: list[Path], rise: float = 0.02) -> list[dict[str, Any]]:
    """What the loss-gap probe said before tau_mem in zoo runs with ``zoo.py --probe N``: the gap at tau_mem,
    the step of the lowest held-out loss and the first step it stood ``rise`` above it, and how far those
    steps lie from tau_mem (a forecast from the probe would need one of them to sit at a fixed place)."""
    rows = []
    for path in paths:
        for run_row in json.loads(path.read_text()):
            readings, tau_mem = run_row.get("probe_readings"), run_row.get("tau_mem")
            if not readings or tau_mem is None:
                continue
            before = [r for r in readings if r["step"] <= tau_mem]
            at = before[-1]
            lowest = min(before, key=lambda r: r["loss_heldout"])
            risen = next((r for r in before if r["step"] > lowest["step"]
                          and r["loss_heldout"] >= (1 + rise) * lowest["loss_heldout"]), None)  # fmt: skip
            half = next((r for r in before if r["gap"] >= 0.5 * at["gap"]), None)
            rows.append({
                "setup": run_row["setup"], "n": run_row["n"], "tau_mem": tau_mem, "gap_at_tau_mem": at["gap"],
                "heldout_lowest_step": lowest["step"],
                "heldout_rise_step": None if risen is None else risen["step"],
                "half_gap_step": None if half is None else half["step"],
            })  # fmt: skip
    print(f"{'setup':<22}{'n':>5}{'tau_mem':>8}{'gap@tau':>9}{'lowest':>8}{'+2%':>7}{'tau/+2%':>9}{'gap/2':>7}{'tau/(gap/2)':>12}")
    for r in rows:
        ratio = "-" if not r["heldout_rise_step"] else f"{r['tau_mem'] / r['heldout_rise_step']:.1f}"
        half = "-" if not r["half_gap_step"] else f"{r['tau_mem'] / r['half_gap_step']:.1f}"
        print(f"{r['setup']:<22}{r['n']:>5}{r['tau_mem']:>8}{r['gap_at_tau_mem']:>9.2f}{r['heldout_lowest_step']:>8}"
              f"{str(r['heldout_rise_step']):>7}{ratio:>9}{str(r['half_gap_step']):>7}{half:>12}")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--n", type=int, nargs="*")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--out", type=Path, default=Path("runs/onset"))
    a = sub.add_parser("analyze")
    a.add_argument("--out", type=Path, default=Path("runs/onset"))
    p = sub.add_parser("probe", help="the loss-gap probe's signals against tau_mem in zoo.py --probe rows")
    p.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.seed, args.n, args.out, args.quick)
    elif args.command == "probe":
        probe_signals(args.paths)
    else:
        analyze(args.out)


if __name__ == "__main__":
    sys.exit(main())

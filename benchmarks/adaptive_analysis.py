"""Analysis half of benchmarks/adaptive_demo.py: replay the adaptive schedule on dense demo runs, tables, plots.

``python benchmarks/adaptive_demo.py analyze --out DIR`` reads ``DIR/n<n>.json`` (written by ``run``) and
writes ``DIR/analysis.json`` and ``DIR/*.png``; the docs figures are copies of the PNGs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning_memwatch.adaptive import AdaptiveSchedule
from lightning_memwatch.metrics.loss_gap import LossGapReading

SIGNAL_THRESHOLD = 0.02  # the schedule's default: the held-out loss 2% above its lowest value
GAP_LEVEL = 0.5  # a second marker: the relative gap reaches one half


def _demo_detector() -> Any:
    from lightning_memwatch import TimescaleDetector
    from lightning_memwatch.apps.demo import DemoConfig

    return TimescaleDetector(**DemoConfig().detector_kwargs())


def probe_readings(run: dict[str, Any], rule: str = "recorded") -> tuple[list[LossGapReading], int]:
    """The probe readings a run would have had: as recorded (the first rule's period) or with today's rule.

    Today's rule (``probe_period``) reads less often than the recorded default probe; its readings are the fine
    probe's (same triples, same values at the same step) every k-th, at the smallest multiple of the fine period
    at or above today's period (exact at n = 64 and 128; a slightly longer period at n = 256 and 512).
    """
    from lightning_memwatch.metrics.loss_gap import probe_period

    if rule == "recorded":
        return [LossGapReading.from_dict(r) for r in run["probe"]], int(run["probe_period"])
    fine = int(run["fine_probe_period"])
    period = probe_period(256, int(run["n"]))
    every = -(-period // fine) * fine
    return [LossGapReading.from_dict(r) for r in run["fine_probe"] if r["step"] % every == 0], every


def replay(
    run: dict[str, Any], *, use_probe: bool = True, probe_rule: str = "today", **schedule_kwargs: Any
) -> dict[str, Any]:
    """Run the adaptive schedule against the dense run's records, as MemWatch would have met them.

    In the benchmark MemWatch's hook runs before the probe's in each step, so an evaluation at step s is
    observed before the probe reading at s; the schedule's decisions do not depend on that order (tested).
    """
    from lightning_memwatch.apps.demo import DemoConfig

    period = int(run["period"])
    dense = {int(r["step"]): r for r in run["history"]}
    last = max(dense)
    schedule = AdaptiveSchedule(min_every=period, **{"max_every": 16 * period, **schedule_kwargs})
    readings, probe_every = probe_readings(run, probe_rule) if use_probe else ([], None)
    detector = _demo_detector()
    stop_patience = DemoConfig().mem_patience  # the detector's patience: training stops when it flags tau_mem
    evaluated: list[int] = []
    above_in_a_row, stopped_at, tau_mem, flagged_after, tau_gen = 0, None, None, None, None
    i = 0
    while schedule.next_step is not None:
        nxt = schedule.next_step
        if i < len(readings) and readings[i].step < nxt:
            schedule.observe_probe(readings[i])
            i += 1
            continue
        if nxt > last:
            break
        record = dense[nxt]
        schedule.observe(record)
        evaluated.append(nxt)
        for event in detector.update(record):
            if event.name == "tau_mem":
                tau_mem, flagged_after = event.step, len(evaluated)
            if event.name == "tau_gen":
                tau_gen = event.step
        above_in_a_row = above_in_a_row + 1 if record["f_mem"] > detector.config()["f0"] else 0
        while i < len(readings) and readings[i].step == nxt:
            schedule.observe_probe(readings[i])
            i += 1
        if above_in_a_row >= stop_patience:
            stopped_at = nxt
            break
    dense_tau = run["tau_mem"]
    dense_to_tau = sum(1 for s in dense if dense_tau is not None and s <= dense_tau)
    return {
        "n": run["n"],
        "period": period,
        "use_probe": use_probe,
        "probe_every": probe_every,
        "next_planned_after_run": schedule.next_step if tau_mem is None else None,
        "settings": schedule.config(),
        "evaluated": evaluated,
        "reasons": [f"{d.next_step}: {d.rule}" for d in schedule.evaluations],
        "tau_mem": tau_mem,
        "dense_tau_mem": dense_tau,
        "tau_gen": tau_gen,
        "dense_tau_gen": run["tau_gen"],
        "tau_mem_error_steps": None if tau_mem is None or dense_tau is None else tau_mem - dense_tau,
        "within_one_grid_step": tau_mem is not None and dense_tau is not None and abs(tau_mem - dense_tau) <= period,
        "evals_to_tau_mem": flagged_after,
        "dense_evals_to_tau_mem": dense_to_tau,
        "fraction_to_tau_mem": None if flagged_after is None else flagged_after / dense_to_tau,
        "evals_total": len(evaluated),
        "stopped_at": stopped_at,
        "dense_evals_total": len(dense),
        "fraction_total": len(evaluated) / len(dense),
    }


def _first(readings: list[dict[str, Any]], test: Any) -> int | None:
    for r in readings:
        if test(r):
            return int(r["step"])
    return None


def openings(run: dict[str, Any], key: str = "fine_probe") -> dict[str, Any]:
    """Steps at which the probe's signals open, against f_mem's onset and tau_mem."""
    readings = run[key]
    low, rises = math.inf, []
    for r in readings:
        low = min(low, r["loss_heldout"])
        rises.append((r["step"], (r["loss_heldout"] - low) / low))
    rise_step = next((s for s, v in rises if v >= SIGNAL_THRESHOLD), None)
    lowest = min(readings, key=lambda r: r["loss_heldout"])["step"]
    onset = _first(run["history"], lambda r: r["f_mem"] > 0)
    return {
        "n": run["n"],
        "probe_period": run[f"{key}_period"] if f"{key}_period" in run else run["probe_period"],
        "heldout_lowest_step": lowest,
        "heldout_rise_step": rise_step,
        "gap_half_step": _first(readings, lambda r: r["gap"] >= GAP_LEVEL),
        "gap_tenth_step": _first(readings, lambda r: r["gap"] >= 0.1),
        "band_gaps_at_tau_mem": next(
            (r["band_gaps"] for r in readings if r["step"] >= (run["tau_mem"] or math.inf)), None
        ),
        "f_mem_onset_step": onset,
        "tau_mem": run["tau_mem"],
        "gap_at_tau_mem": next((r["gap"] for r in readings if r["step"] >= (run["tau_mem"] or math.inf)), None),
        "rise_at_tau_mem": next((v for s, v in rises if s >= (run["tau_mem"] or math.inf)), None),
    }


def ddim_agreement(run: dict[str, Any]) -> dict[str, Any]:
    """DDIM-20 and DDIM-50 f_mem against DDIM-100 (MemWatch's) at every evaluation, with its bootstrap interval."""
    dense = {int(r["step"]): r for r in run["history"]}
    f0 = _demo_detector().config()["f0"]
    out: dict[str, Any] = {"n": run["n"]}
    for steps in (20, 50):
        inside, rows, differences = 0, 0, []
        first_above = None
        for row in run["ddim"]:
            ref = dense[int(row["step"])]
            f = row[f"ddim{steps}"]["f_mem"]
            if ref["f_mem"] > 0 or f > 0:
                rows += 1
                inside += ref["f_mem_ci_low"] <= f <= ref["f_mem_ci_high"]
                differences.append(f - ref["f_mem"])
            if first_above is None and f > f0:
                first_above = int(row["step"])
        out[f"ddim{steps}"] = {
            "evaluations_with_copies": rows,
            "inside_ddim100_interval": inside,
            "mean_difference": sum(differences) / len(differences) if differences else None,
            "tau_mem": first_above,
            "seconds": sum(r[f"ddim{steps}"]["seconds"] for r in run["ddim"]) / len(run["ddim"]),
        }
    recomputed = [r for r in run["ddim"] if "ddim100_recomputed" in r]
    out["ddim100_recomputed_equal"] = all(
        abs(r["ddim100_recomputed"]["f_mem"] - r["f_mem_100"]) < 1e-12 for r in recomputed
    )
    out["ddim100_seconds"] = (
        sum(r["ddim100_recomputed"]["seconds"] for r in recomputed) / len(recomputed) if recomputed else None
    )
    out["tau_mem_ddim100"] = run["tau_mem"]
    return out


def costs(run: dict[str, Any]) -> dict[str, Any]:
    """The probe's cost: measured with the recorded period, and for today's rule from the same measurements."""
    from lightning_memwatch.metrics.loss_gap import probe_period

    t = run["timing"]
    readings = t["probe_readings"] + len(run["fine_probe"])
    ms_reading = 1000 * (t["probe_seconds"] + t["fine_probe_seconds"]) / readings
    ms_step = 1000 * t["train_step_seconds"] / max(t["train_steps"], 1)
    today = probe_period(256, int(run["n"]))
    return {
        "n": run["n"],
        "recorded_period": run["probe_period"],
        "recorded_readings": t["probe_readings"],
        "recorded_fraction_of_train_steps": t["probe_seconds"] / t["train_step_seconds"],
        "ms_per_reading": ms_reading,
        "ms_per_train_step": ms_step,
        "today_period": today,
        "today_fraction_of_train_steps": ms_reading / (today * ms_step),
        "eval_fraction_of_wall": t["eval_seconds"] / t["wall_seconds"],
        "eval_seconds_per_evaluation": t["eval_seconds"] / len(run["history"]),
    }


def _fit_exponent(ns: list[int], values: list[int | None]) -> float | None:
    pairs = [(math.log(n), math.log(v)) for n, v in zip(ns, values, strict=True) if v]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    sxx = sum((p[0] - mx) ** 2 for p in pairs)
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / sxx


def _plots(runs: list[dict[str, Any]], opens: list[dict[str, Any]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        n = run["n"]
        low, rise = math.inf, []
        for r in run["fine_probe"]:
            low = min(low, r["loss_heldout"])
            rise.append((r["loss_heldout"] - low) / low)
        steps = [r["step"] for r in run["fine_probe"]]
        (line,) = axes[0].plot(steps, [r["gap"] for r in run["fine_probe"]], label=f"n={n}")
        axes[1].plot(steps, rise, color=line.get_color(), label=f"n={n}")
        axes[2].plot(
            [r["step"] for r in run["history"]], [r["f_mem"] for r in run["history"]], color=line.get_color()
        )
        for ax in axes:
            if run["tau_mem"]:
                ax.axvline(run["tau_mem"], color=line.get_color(), ls=":", lw=1)
    axes[0].set(xlabel="optimizer step", ylabel="relative loss gap", xscale="log", title="loss gap (train vs held-out)")
    axes[1].axhline(SIGNAL_THRESHOLD, color="k", lw=0.8, ls="--")
    axes[1].set(xlabel="optimizer step", ylabel="(L_heldout - min) / min", xscale="log", title="held-out loss rise")
    axes[2].axhline(0.03, color="k", lw=0.8, ls="--")
    axes[2].set(xlabel="optimizer step", ylabel="f_mem", xscale="log", title="f_mem (DDIM-100); dotted: tau_mem")
    axes[0].legend()
    fig.tight_layout()
    first = out / "probe_signals.png"
    fig.savefig(first, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ns = [o["n"] for o in opens]
    for key, label, marker in (
        ("heldout_rise_step", "held-out loss +2%", "o"),
        ("gap_half_step", "loss gap 0.5", "s"),
        ("f_mem_onset_step", "f_mem > 0", "^"),
        ("tau_mem", "tau_mem (f_mem > 3%)", "D"),
    ):
        values = [o[key] for o in opens]
        ax.plot([n for n, v in zip(ns, values, strict=True) if v], [v for v in values if v], marker=marker, label=label)
    ax.set(xscale="log", yscale="log", xlabel="training images n", ylabel="optimizer step", title="onsets vs n")
    ax.legend()
    fig.tight_layout()
    second = out / "probe_onsets.png"
    fig.savefig(second, dpi=110)
    plt.close(fig)
    return [str(first), str(second)]


def analyze(out: Path) -> dict[str, Any]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("n*.json"), key=lambda p: int(p.stem[1:]))]
    if not runs:
        raise SystemExit(f"No runs under {out}: run `python benchmarks/adaptive_demo.py run` first.")
    result: dict[str, Any] = {
        "replay_probe": [replay(r) for r in runs],
        "replay_probe_recorded_period": [replay(r, probe_rule="recorded") for r in runs],
        "replay_no_probe": [replay(r, use_probe=False) for r in runs],
        "replay_gap_signal": [replay(r, signal="gap", signal_threshold=GAP_LEVEL) for r in runs],
        "replay_probe_max64": [replay(r, max_every=64 * r["period"]) for r in runs],
        "replay_no_probe_max64": [replay(r, use_probe=False, max_every=64 * r["period"]) for r in runs],
        "openings": [openings(r) for r in runs],
        "openings_default_probe": [openings(r, "probe") for r in runs],
        "ddim": [ddim_agreement(r) for r in runs],
        "costs": [costs(r) for r in runs],
    }
    ns = [r["n"] for r in runs]
    result["exponents"] = {
        key: _fit_exponent(ns, [o[key] for o in result["openings"]])
        for key in ("heldout_rise_step", "gap_half_step", "gap_tenth_step", "f_mem_onset_step", "tau_mem")
    }
    result["plots"] = _plots(runs, result["openings"], out)
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    for name in (
        "replay_probe",
        "replay_probe_recorded_period",
        "replay_no_probe",
        "replay_gap_signal",
        "replay_probe_max64",
        "replay_no_probe_max64",
    ):
        print(f"\n{name}:  n  grid  dense tau  adaptive tau  evals to tau (dense)  evals total (dense)")
        for r in result[name]:
            frac = r["fraction_to_tau_mem"]
            print(
                f"  {r['n']:>5} {r['period']:>5} {r['dense_tau_mem']!s:>10} {r['tau_mem']!s:>13} "
                f"{r['evals_to_tau_mem']!s:>6} ({r['dense_evals_to_tau_mem']}) = "
                f"{'' if frac is None else f'{100 * frac:.0f}%':>4}   {r['evals_total']:>4} ({r['dense_evals_total']})"
                f"  {r['evaluated']} probe every {r['probe_every']} next {r['next_planned_after_run']}"
            )
    print("\nopenings (fine probe): n  heldout lowest  heldout +2%  gap 0.5  f_mem>0  tau_mem  gap@tau  rise@tau")
    for o in result["openings"]:
        print(
            f"  {o['n']:>5} {o['heldout_lowest_step']!s:>8} {o['heldout_rise_step']!s:>8} {o['gap_half_step']!s:>8} "
            f"{o['f_mem_onset_step']!s:>8} {o['tau_mem']!s:>8} {o['gap_at_tau_mem']:.3f} {o['rise_at_tau_mem']:.3f} "
            f"gap>=0.1 at {o['gap_tenth_step']} bands@tau {[round(g, 3) for g in o['band_gaps_at_tau_mem']]}"
        )
    print("exponents (step ~ n^k):", result["exponents"])
    print("\nddim:")
    for d in result["ddim"]:
        print(" ", json.dumps(d))
    print("\ncosts:")
    for c in result["costs"]:
        print(" ", json.dumps(c))


def verify(n: int, out: Path, threads: int) -> None:
    """One live run with MemWatch(schedule=AdaptiveSchedule(probe=...)); compare with the replay."""
    import time

    import torch

    from benchmarks.adaptive_parts import build_parts, demo_trainer, ema_warmup_callback, load_classifier
    from lightning_memwatch.apps.demo import DemoConfig, _quiet_lightning
    from lightning_memwatch.callbacks.probe import LossGapProbe

    torch.set_num_threads(threads)
    _quiet_lightning()
    config = DemoConfig(out=out)
    run = json.loads((out / f"n{n}.json").read_text())
    period = config.eval_period(n)
    probe = LossGapProbe()
    schedule = AdaptiveSchedule(min_every=period, max_every=16 * period, probe=probe)
    parts = build_parts(n, config, load_classifier(config, out), schedule)

    trainer = demo_trainer(config, n, [ema_warmup_callback(config), parts["watch"], parts["stopper"], probe])
    start = time.perf_counter()
    trainer.fit(parts["model"], datamodule=parts["datamodule"])
    live = {
        "n": n,
        "wall_seconds": time.perf_counter() - start,
        "evaluated": [int(r["step"]) for r in parts["watch"].history],
        "tau_mem": parts["watch"].tau_mem,
        "f_mem": [r["f_mem"] for r in parts["watch"].history],
        "reasons": [schedule.reason_for(int(r["step"])) for r in parts["watch"].history],
    }
    replayed = replay(run)
    dense = {int(r["step"]): r["f_mem"] for r in run["history"]}
    live["replay_evaluated"] = replayed["evaluated"]
    live["replay_tau_mem"] = replayed["tau_mem"]
    live["same_steps"] = live["evaluated"] == replayed["evaluated"]
    common = [(s, f) for s, f in zip(live["evaluated"], live["f_mem"], strict=True) if s in dense]
    live["steps_past_the_dense_run"] = [s for s in live["evaluated"] if s not in dense]
    live["same_f_mem_as_dense"] = all(abs(dense[s] - f) < 1e-12 for s, f in common)
    (out / f"verify_n{n}.json").write_text(json.dumps(live, indent=1) + "\n")
    print(json.dumps(live, indent=1))

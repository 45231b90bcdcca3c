"""The loss-gap probe and the adaptive schedule measured on ``memwatch demo`` (docs/probe.md).

Two steps::

    # 1. one dense run per n, exactly the demo's (same data, model, MemWatch, detector, early stopping), plus
    #    the loss-gap probe at its default period, a finer probe (for the lead/lag analysis) and, at every
    #    evaluation, f_mem of DDIM-20 and DDIM-50 samples from the same noises as MemWatch's DDIM-100:
    python benchmarks/adaptive_demo.py run --n 64 128 256 --out runs/adaptive_demo
    python benchmarks/adaptive_demo.py run --n 512 --out runs/adaptive_demo
    # 2. replay the adaptive schedule on the recorded runs, tables and plots:
    python benchmarks/adaptive_demo.py analyze --out runs/adaptive_demo

Step 2 is exact, not an approximation: the adaptive schedule only picks steps of the dense grid (its
``multiple`` is the dense period), evaluations draw their noise from their own generators and run in eval
mode without gradients, so training is the same whichever steps are evaluated; an evaluation at a step gives
the record the dense run logged there. ``verify`` runs one live adaptive run (MemWatch(schedule=adaptive)) and
compares it with the replay::

    python benchmarks/adaptive_demo.py verify --n 64 --out runs/adaptive_demo

``live`` runs the adaptive schedule live without a dense run (no recorded records needed), times the probe
against the training steps, and compares with the replay kept in ``benchmarks/results/``::

    nice -n 10 python benchmarks/adaptive_demo.py live --n 128 --out runs/adaptive_live
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: the repo root on the path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.adaptive_parts import (  # noqa: E402
    StepTimer,
    build_parts,
    demo_trainer,
    ema_warmup_callback,
    load_classifier,
)

FINE_DIVISOR = 4  # the fine probe reads every dense-period / 4 steps


def run_one(n: int, out: Path, threads: int, max_steps: int | None = None) -> dict[str, Any]:
    """The dense demo run for ``n`` with the probes and the DDIM-20/50 check; writes ``<out>/n<n>.json``."""
    from lightning_memwatch import EvalSchedule
    from lightning_memwatch.apps.demo import DemoConfig, _quiet_lightning
    from lightning_memwatch.callbacks.probe import LossGapProbe
    from lightning_memwatch.metrics.knn import NearestNeighbourIndex
    from lightning_memwatch.metrics.memorization import memorization_fraction
    from lightning_memwatch.sampling import per_sample_noise

    torch.set_num_threads(threads)
    _quiet_lightning()
    config = DemoConfig(out=out)
    if max_steps is not None:  # smoke runs only
        config = DemoConfig(out=out, max_steps_per_image=0, max_steps_extra=max_steps)
    out.mkdir(parents=True, exist_ok=True)
    state = load_classifier(config, out)
    period = config.eval_period(n)
    parts = build_parts(n, config, state, EvalSchedule.every(period, include_zero=True))
    watch, model, datamodule = parts["watch"], parts["model"], parts["datamodule"]
    probe = LossGapProbe()  # the default: held-out = the datamodule's reference images, auto period
    fine = LossGapProbe(every_n_train_steps=max(1, period // FINE_DIVISOR))
    train = datamodule.train_images()
    index = NearestNeighbourIndex(train, backend="torch")
    noise = per_sample_noise(range(config.num_samples), tuple(train.shape[1:]), config.seed)
    ddim: list[dict[str, Any]] = []

    def other_steps(trainer: Any, module: Any, record: dict[str, Any]) -> None:
        row: dict[str, Any] = {"step": record["step"], "f_mem_100": record["f_mem"]}
        for steps in (20, 50) + ((100,) if record["f_mem"] > 0 else ()):
            t0 = time.perf_counter()
            with torch.inference_mode():
                samples = module.sample(config.num_samples, noise=noise, num_steps=steps)
            result = memorization_fraction(
                samples, index, threshold=watch.threshold, bootstrap=config.bootstrap, seed=config.seed
            )
            key = f"ddim{steps}" if steps != 100 else "ddim100_recomputed"
            row[key] = {
                "f_mem": float(result.fraction),
                "ci_low": float(result.ci_low),
                "ci_high": float(result.ci_high),
                "seconds": time.perf_counter() - t0,
            }
        ddim.append(row)

    watch.add_listener(other_steps)

    timer = StepTimer()
    # the timer's hooks bracket the training step only; the probes and MemWatch run after its batch end
    callbacks = [ema_warmup_callback(config), timer.callback, watch, parts["stopper"], probe, fine]
    trainer = demo_trainer(config, n, callbacks)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    result = {
        "n": n,
        "period": period,
        "steps": int(trainer.global_step),
        "max_steps": config.max_steps(n),
        "tau_gen": watch.tau_gen,
        "tau_mem": watch.tau_mem,
        "history": [dict(r) for r in watch.history],  # EvalRecords as the flat dicts of earlier versions
        "probe_period": probe.period,
        "probe": [r.to_dict() for r in probe.history],
        "fine_probe_period": fine.period,
        "fine_probe": [r.to_dict() for r in fine.history],
        "band_edges": list(probe.triples.edges) if probe.triples is not None else None,
        "ddim": ddim,
        "timing": {
            "wall_seconds": wall,
            "train_step_seconds": timer.seconds,
            "train_steps": timer.steps,
            "eval_seconds": sum(r["sample_seconds"] + r["metric_seconds"] for r in watch.history),
            "probe_seconds": probe.seconds,
            "probe_readings": len(probe.history),
            "fine_probe_seconds": fine.seconds,
            "ddim_extra_seconds": sum(v["seconds"] for row in ddim for k, v in row.items() if k.startswith("ddim")),
        },
        "threads": threads,
    }
    (out / f"n{n}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    t = result["timing"]
    print(
        f"n={n}: {result['steps']} steps in {wall:.0f} s; tau_gen={watch.tau_gen} tau_mem={watch.tau_mem}; "
        f"probe every {probe.period} steps, {t['probe_seconds']:.2f} s = "
        f"{100 * t['probe_seconds'] / max(t['train_step_seconds'], 1e-9):.2f}% of the training steps' time",
        flush=True,
    )
    return result


RECORDED_ANALYSIS = Path(__file__).with_name("results") / "adaptive_demo_analysis.json"


def run_live(n: int, out: Path, threads: int) -> dict[str, Any]:
    """One live adaptive run: the demo's pieces with ``AdaptiveSchedule(probe=LossGapProbe())``; ``live_n<n>.json``."""

    from lightning_memwatch import AdaptiveSchedule
    from lightning_memwatch.apps.demo import DemoConfig, _quiet_lightning
    from lightning_memwatch.callbacks.probe import LossGapProbe

    torch.set_num_threads(threads)
    _quiet_lightning()
    config = DemoConfig(out=out)
    out.mkdir(parents=True, exist_ok=True)
    period = config.eval_period(n)
    probe = LossGapProbe()
    schedule = AdaptiveSchedule(min_every=period, max_every=16 * period, probe=probe)
    parts = build_parts(n, config, load_classifier(config, out), schedule)
    watch = parts["watch"]

    timer = StepTimer()
    trainer = demo_trainer(config, n, [ema_warmup_callback(config), timer.callback, watch, parts["stopper"], probe])
    start = time.perf_counter()
    trainer.fit(parts["model"], datamodule=parts["datamodule"])
    wall = time.perf_counter() - start
    eval_seconds = sum(r["sample_seconds"] + r["metric_seconds"] for r in watch.history)
    live: dict[str, Any] = {
        "n": n,
        "period": period,
        "steps": int(trainer.global_step),
        "evaluated": [int(r["step"]) for r in watch.history],
        "f_mem": [float(r["f_mem"]) for r in watch.history],
        "reasons": [schedule.reason_for(int(r["step"])) for r in watch.history],
        "tau_mem": watch.tau_mem,
        "tau_gen": watch.tau_gen,
        "probe_period": probe.period,
        "probe_readings": len(probe.history),
        "timing": {
            "wall_seconds": wall,
            "train_step_seconds": timer.seconds,
            "train_steps": timer.steps,
            "probe_seconds": probe.seconds,
            "probe_fraction_of_train_steps": probe.seconds / max(timer.seconds, 1e-9),
            "ms_per_reading": 1000 * probe.seconds / max(len(probe.history), 1),
            "ms_per_train_step": 1000 * timer.seconds / max(timer.steps, 1),
            "eval_seconds": eval_seconds,
        },
        "threads": threads,
    }
    if RECORDED_ANALYSIS.is_file():
        recorded = json.loads(RECORDED_ANALYSIS.read_text())
        for row in recorded.get("replay_probe", []):
            if row.get("n") == n:
                live["recorded_replay"] = {
                    k: row[k] for k in ("evaluated", "tau_mem", "dense_tau_mem", "dense_evals_total")
                }
                dense = row["dense_tau_mem"]
                live["tau_mem_error_steps_vs_recorded_dense"] = None if watch.tau_mem is None else watch.tau_mem - dense
                live["evaluations_vs_recorded_dense"] = len(watch.history) / row["dense_evals_total"]
    (out / f"live_n{n}.json").write_text(json.dumps(live, indent=1, default=float) + "\n")
    print(json.dumps(live, indent=1, default=float), flush=True)
    return live


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "analyze", "verify", "live"])
    parser.add_argument("--n", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--out", type=Path, default=Path("runs/adaptive_demo"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="cap the runs (smoke test)")
    args = parser.parse_args(argv)
    if args.command == "run":
        for n in args.n:
            run_one(n, args.out, args.threads, args.max_steps)
        return 0
    if args.command == "live":
        for n in args.n:
            run_live(n, args.out, args.threads)
        return 0
    from benchmarks.adaptive_analysis import analyze, verify  # noqa: PLC0415 (the analysis needs more imports)

    if args.command == "analyze":
        analyze(args.out)
    else:
        for n in args.n:
            verify(n, args.out, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())

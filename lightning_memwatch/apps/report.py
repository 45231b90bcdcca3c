"""``memwatch report LOGDIR``: read MemWatch runs back from TensorBoard, flag the timescales, fit tau_mem(n).

A *run* is a directory holding a ``memwatch_run.json`` metadata file (written by ``memwatch demo`` and
``memwatch sweep`` with :func:`write_run_metadata`) and, anywhere below it, the TensorBoard event files that
:class:`~lightning_memwatch.MemWatch` wrote (the scalar keys of :mod:`lightning_memwatch.log`). The metadata
file is JSON::

    {"format": "lightning_memwatch.run/1",   # this layout
     "n": 64,                                # training-set size (images): the x axis of the fit
     "label": "digits n=64",                 # optional: legend text
     "quality_label": "FID",                 # optional: what memwatch/fid holds (axis label)
     "detector": {...},                      # optional: TimescaleDetector settings of the run (its config())
     ...}                                    # anything else (settings, results) is kept but not read

The report rebuilds each run's history (one record per evaluation, the fields of ``MemWatch.history``: step,
f_mem, f_mem_ci_low, f_mem_ci_high, ratio_median, fid, ...), applies
:func:`~lightning_memwatch.detection.detect_timescales` offline (the run's own detector settings unless
overridden), fits tau_mem against n (:func:`~lightning_memwatch.fits.fit_tau_mem`) and writes

* ``LOGDIR/summary.json``: ``{"runs": [{"n", "tau_gen", "tau_mem", "final_f_mem", "best_fid", ...}],
  "fit": {"slope", "intercept", "r2", "exponent", ...}, "forecast": {...}}`` (a tau that never fired is null;
  fit values are null when fewer than two distinct n reached tau_mem): ``slope`` and ``r2`` belong to the
  paper's law tau_mem = slope * n (through the origin, what the forecast uses; ``intercept`` is 0), ``exponent``
  and ``prefactor`` to the log-log fit; ``fit["affine"]`` holds the unconstrained fit's ``slope``,
  ``intercept`` and ``r2``, ``fit["loglog"]`` the log-log fit's ``exponent``, ``prefactor`` and ``r2``;
* ``LOGDIR/plots/``: ``f_mem_vs_step.png``, ``f_mem_vs_step_over_n.png`` (the collapse),
  ``quality_vs_step.png`` (FID or the run's quality signal), ``timescales_vs_n.png`` (tau_gen and tau_mem vs
  n with the linear fit and R^2, and log-log with the exponent), ``tau_mem_forecast.png``;

and prints a table. A directory with event files but no metadata file is still read; its ``n`` then comes
from a ``memwatch sweep`` manifest (``LOGDIR/sweep.json``: the run's ``data.init_args.n``) when the directory
lies in one of the listed runs, else it is unknown and the run is left out of the fit (the warning says how to
add the metadata file).

Plots use matplotlib's Agg canvas directly (no pyplot, the global backend is left alone).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_memwatch import log as mwlog
from lightning_memwatch.detection import TimescaleDetector, detect_timescales
from lightning_memwatch.fits import TooFewRunsError, fit_tau_mem
from lightning_memwatch.record import NOT_RECORD_KEYS, EvalRecord

__all__ = [
    "PLOT_NAMES",
    "RUN_FORMAT",
    "RUN_METADATA",
    "RunHistory",
    "find_runs",
    "format_table",
    "load_run",
    "main",
    "read_event_records",
    "report",
    "settings_differences",
    "summarize_run",
    "write_plots",
    "write_run_metadata",
]

RUN_METADATA = "memwatch_run.json"
"""Name of the per-run metadata file."""
RUN_FORMAT = "lightning_memwatch.run/1"
"""Value of its ``"format"`` field."""
SUMMARY_FILENAME = "summary.json"
PLOTS_DIRNAME = "plots"
PLOT_NAMES = (
    "f_mem_vs_step.png",
    "f_mem_vs_step_over_n.png",
    "quality_vs_step.png",
    "timescales_vs_n.png",
    "tau_mem_forecast.png",
)
"""The PNG files written under ``LOGDIR/plots``."""

_EVENT_PREFIX = "events.out.tfevents."


# ------------------------------------------------------------------------------------------------------------
# run metadata


def write_run_metadata(run_dir: str | os.PathLike[str], *, n: int | None, **fields: Any) -> Path:
    """Write (atomically, replacing any previous one) ``run_dir/memwatch_run.json``.

    Args:
        run_dir: the run's directory (its TensorBoard event files live in it or below it); created if missing.
        n: training-set size (images), or None when unknown.
        **fields: anything JSON-able; the report reads ``label``, ``quality_label`` and ``detector`` (the
            :class:`~lightning_memwatch.TimescaleDetector` settings, e.g. ``detector.config()``).

    Returns:
        The file's path.
    """
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise ValueError(f"n must be a positive number of training images or None; got {n!r}.")
    directory = Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": RUN_FORMAT, "n": None if n is None else int(n), **fields}
    path = directory / RUN_METADATA
    tmp = directory / f".{RUN_METADATA}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"Cannot read run metadata {path}: {err}. Rewrite it (write_run_metadata).") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object like {{\"n\": 64}}; got {type(data).__name__}.")
    return data


# ------------------------------------------------------------------------------------------------------------
# reading TensorBoard


def _event_dirs(root: Path, exclude: set[Path]) -> list[Path]:
    """Directories under ``root`` (inclusive) holding event files, skipping subtrees rooted in ``exclude``."""
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d) not in exclude)
        if any(name.startswith(_EVENT_PREFIX) for name in filenames):
            found.add(here)
    return sorted(found)


def read_event_records(directories: Sequence[str | os.PathLike[str]]) -> list[EvalRecord]:
    """Rebuild MemWatch's per-evaluation records from the ``memwatch/*`` scalars of TensorBoard event files.

    Every step at which ``memwatch/f_mem`` was logged is one record: the ``memwatch/`` scalars logged at that
    step are read back through :meth:`~lightning_memwatch.EvalRecord.from_scalars` (the one mapping between
    record fields and logged keys), so the fields are named as in ``MemWatch.history`` (``f_mem_ci_low``,
    ``fid``, user metrics by their name, ...). Fields that are not logged (``num_samples``, the outer ratio
    quantiles, the timings) are None and absent from the record's mapping view, except ``fid`` and
    ``fid_num_samples`` (None). When several directories (or a resumed run) log the same step, the later
    directory wins, key by key.

    Args:
        directories: directories holding event files (each read with TensorBoard's event accumulator).

    Returns:
        :class:`~lightning_memwatch.EvalRecord` records in increasing step order.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    by_step: dict[int, dict[str, float]] = {}
    for directory in directories:
        acc = ea.EventAccumulator(
            str(directory),
            size_guidance={ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1, ea.TENSORS: 1, ea.AUDIO: 1},
        )
        acc.Reload()
        tags = acc.Tags().get(ea.SCALARS, [])
        if mwlog.F_MEM not in tags:
            continue
        steps = {int(e.step) for e in acc.Scalars(mwlog.F_MEM)}
        for tag in tags:
            if not tag.startswith(mwlog.PREFIX) or tag in NOT_RECORD_KEYS:
                continue
            for event in acc.Scalars(tag):
                step = int(event.step)
                if step in steps:
                    by_step.setdefault(step, {})[tag] = float(event.value)
    return [EvalRecord.from_scalars(step, by_step[step]) for step in sorted(by_step)]


@dataclass
class RunHistory:
    """One run read back from disk.

    Attributes:
        run_dir: the run's directory.
        n: training-set size (images), or None when unknown.
        metadata: the ``memwatch_run.json`` content ({} when absent).
        records: per-evaluation records in step order (see :func:`read_event_records`).
    """

    run_dir: Path
    n: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    records: list[EvalRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        """Legend text: the metadata's ``label``, else ``n=<n>``, else the run's name: the directory name, with
        Lightning's ``lightning_logs/version_<k>`` levels replaced by the experiment's name (``v<k>`` added
        when k > 0), so runs never show as ``version_0``."""
        label = self.metadata.get("label")
        if label:
            return str(label)
        return f"n={self.n}" if self.n is not None else run_name(self.run_dir)

    @property
    def quality_label(self) -> str:
        """What the ``fid`` field holds (axis label): the metadata's ``quality_label``, else ``"FID"``."""
        return str(self.metadata.get("quality_label") or "FID")


_VERSION_DIR = re.compile(r"^version_(\d+)$")


def run_name(run_dir: str | os.PathLike[str]) -> str:
    """A readable name of a run directory: ``exp/version_0`` -> ``exp``, ``exp/version_2`` -> ``exp v2``,
    ``sweep/n64/lightning_logs/version_0`` -> ``n64``; any other directory keeps its name."""
    parts = list(Path(run_dir).resolve().parts)
    version = None
    if parts and (m := _VERSION_DIR.match(parts[-1])):
        version = int(m.group(1))
        parts.pop()
        if parts and parts[-1] == "lightning_logs":
            parts.pop()
    if version is None or not parts or parts[-1] in ("", "/"):
        return Path(run_dir).name
    return parts[-1] + (f" v{version}" if version else "")


def find_runs(logdir: str | os.PathLike[str]) -> list[Path]:
    """Run directories under ``logdir``: those holding ``memwatch_run.json``; without any, every directory
    whose event files hold ``memwatch/f_mem`` scalars (sorted paths)."""
    root = Path(logdir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: pass the directory of the runs' TensorBoard logs")
    with_metadata = sorted(p.parent for p in root.rglob(RUN_METADATA))
    if with_metadata:
        return with_metadata
    return _event_dirs(root, set())


def load_run(run_dir: str | os.PathLike[str], *, nested_runs: Sequence[Path] = ()) -> RunHistory:
    """Read one run: its metadata (if any) and the records of the event files below it.

    Args:
        run_dir: the run directory.
        nested_runs: run directories inside this one, whose event files belong to them, not to this run.
    """
    directory = Path(run_dir)
    meta_path = directory / RUN_METADATA
    metadata = _read_metadata(meta_path) if meta_path.is_file() else {}
    raw_n = metadata.get("n")
    n = None if raw_n is None else int(raw_n)
    records = read_event_records(_event_dirs(directory, {Path(p) for p in nested_runs}))
    return RunHistory(run_dir=directory, n=n, metadata=metadata, records=records)


_PER_RUN_SETTINGS = frozenset({"out"})  # settings that name the output, not the experiment


def settings_differences(runs: Sequence[RunHistory], limit: int = 3) -> str:
    """The metadata settings (``settings`` and ``detector``) on which runs disagree, e.g.
    ``"settings.lr: 0.001 (n=64), 0.003 (n=8, n=16)"``; empty when they agree or no run records any."""
    values: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        for group in ("settings", "detector"):
            entries = run.metadata.get(group)
            if not isinstance(entries, Mapping):
                continue
            for key, value in entries.items():
                if key not in _PER_RUN_SETTINGS:
                    values.setdefault(f"{group}.{key}", {}).setdefault(json.dumps(value), []).append(run.label)
    described = [
        f"{key}: " + ", ".join(f"{value} ({', '.join(labels)})" for value, labels in by_value.items())
        for key, by_value in values.items()
        if len(by_value) > 1
    ]
    return "; ".join(described[:limit]) + (f"; and {len(described) - limit} more" if len(described) > limit else "")


def _sweep_sizes(root: Path) -> dict[Path, tuple[str, int]]:
    """``{run directory: (name, n)}`` from a ``memwatch sweep`` manifest ``root/sweep.json``, when there is one.

    The manifest lists each run's ``name`` (its directory under ``root``) and ``params``; ``n`` is the value of
    ``data.init_args.n``. Runs without it are skipped.
    """
    manifest = root / "sweep.json"
    if not manifest.is_file():
        return {}
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return {}
    sizes: dict[Path, tuple[str, int]] = {}
    for run in data.get("runs", []) if isinstance(data, dict) else []:
        if not isinstance(run, dict) or not isinstance(run.get("name"), str):
            continue
        value = (run.get("params") or {}).get("data.init_args.n")
        try:
            n = int(value)
        except (TypeError, ValueError):
            continue
        sizes[root / run["name"]] = (run["name"], n)
    return sizes


def _fill_from_sweep(run: RunHistory, sweep: Mapping[Path, tuple[str, int]]) -> None:
    """Give a run without metadata its ``n`` (and label) from the sweep manifest, if it lies in a listed run."""
    for directory in (run.run_dir, *run.run_dir.parents):
        if directory in sweep:
            name, n = sweep[directory]
            run.n = n
            run.metadata = {**run.metadata, "label": name, "n_from": "sweep.json"}
            return


# ------------------------------------------------------------------------------------------------------------
# per-run summary and the fit


def _detector_kwargs(run: RunHistory, override: Mapping[str, Any] | None) -> dict[str, Any]:
    kwargs = dict(run.metadata.get("detector") or {})
    if override:
        kwargs.update(override)
        if "floor" in override and override["floor"] is not None and "gen_rule" not in override:
            kwargs["gen_rule"] = "floor"
    if kwargs.get("gen_rule") == "plateau":
        kwargs.pop("floor", None)
    return kwargs


def _finite(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return out


def summarize_run(
    run: RunHistory, detector: Mapping[str, Any] | None = None, *, relative_to: Path | None = None
) -> dict[str, Any]:
    """Timescales and headline numbers of one run (one entry of ``summary.json``'s ``"runs"``).

    Args:
        run: the run.
        detector: :class:`~lightning_memwatch.TimescaleDetector` settings overriding the run's own.
        relative_to: write ``run`` as a path relative to this directory.

    Returns:
        ``{"n", "run", "tau_gen", "tau_mem", "final_f_mem", "best_fid", "best_fid_step", "final_step",
        "num_evaluations", "tau_gen_rule", "tau_gen_reason", "tau_mem_rule", "tau_mem_reason", "detector"}``
        (steps are optimizer steps; None where there is nothing to report).
    """
    kwargs = _detector_kwargs(run, detector)
    settings = TimescaleDetector(**kwargs).config()
    tau_gen, tau_mem = detect_timescales(run.records, **kwargs) if run.records else (None, None)
    quality = [(r["step"], float(r["fid"])) for r in run.records if _finite([r.get("fid")])]
    best = min(quality, key=lambda sq: sq[1]) if quality else None
    f_mems = [r for r in run.records if _finite([r.get("f_mem")])]
    path = run.run_dir
    if relative_to is not None:
        try:
            path = run.run_dir.relative_to(relative_to)
        except ValueError:
            pass
    return {
        "n": run.n,
        "run": str(path),
        "tau_gen": None if tau_gen is None else tau_gen.step,
        "tau_mem": None if tau_mem is None else tau_mem.step,
        "final_f_mem": float(f_mems[-1]["f_mem"]) if f_mems else None,
        "best_fid": None if best is None else best[1],
        "best_fid_step": None if best is None else best[0],
        "final_step": run.records[-1]["step"] if run.records else None,
        "num_evaluations": len(run.records),
        "tau_gen_rule": None if tau_gen is None else tau_gen.rule,
        "tau_gen_reason": None if tau_gen is None else tau_gen.reason,
        "tau_mem_rule": None if tau_mem is None else tau_mem.rule,
        "tau_mem_reason": None if tau_mem is None else tau_mem.reason,
        "detector": settings,
    }


_NO_FIT = {"slope": None, "intercept": None, "r2": None, "exponent": None}


def _fit(runs: Sequence[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The ``"fit"`` summary (:func:`~lightning_memwatch.fits.fit_tau_mem`'s three fits) and, when it exists,
    the forecast (predictions at 2, 4 and 8 times the largest n)."""
    usable = [r for r in runs if r["n"] is not None]
    ns, taus = [r["n"] for r in usable], [r["tau_mem"] for r in usable]
    try:
        fit = fit_tau_mem(ns, taus)
    except TooFewRunsError:
        return dict(_NO_FIT), None
    summary: dict[str, Any] = {
        # the paper's law through the origin (what the forecast uses), plus the log-log exponent
        "slope": fit.origin.slope,
        "intercept": 0.0,
        "r2": fit.origin.r2,
        "exponent": fit.exponent,
        "num_runs": fit.num_runs,
        "prefactor": fit.prefactor,
        "affine": {"slope": fit.affine.slope, "intercept": fit.affine.intercept, "r2": fit.affine.r2},
        "loglog": {"exponent": fit.exponent, "prefactor": fit.prefactor, "r2": fit.loglog.r2},
    }
    targets = [int(max(ns) * k) for k in (2, 4, 8)]
    prediction = {
        "rule": "tau_mem = slope * n",
        "n": targets,
        "tau_mem": [fit.predict(t) for t in targets],
    }
    return summary, prediction


# ------------------------------------------------------------------------------------------------------------
# the report


def report(
    logdir: str | os.PathLike[str],
    *,
    detector: Mapping[str, Any] | None = None,
    plots: bool = True,
    write: bool = True,
    echo: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Read every run under ``logdir``, flag tau_gen / tau_mem offline, fit tau_mem vs n, write the outputs.

    Args:
        logdir: directory holding the runs (searched recursively for ``memwatch_run.json``).
        detector: :class:`~lightning_memwatch.TimescaleDetector` settings overriding each run's own (e.g.
            ``{"mem_rule": "threshold", "f0": 0.03}``).
        plots: write the PNG plots under ``logdir/plots``.
        write: write ``logdir/summary.json``.
        echo: where the table goes (None: print nothing).

    Returns:
        The summary: ``{"logdir", "runs": [...], "fit": {"slope", "intercept", "r2", "exponent", "num_runs",
        "prefactor", "affine": {"slope", "intercept", "r2"}, "loglog": {"exponent", "prefactor", "r2"}},
        "forecast": {"n": [...], "tau_mem": [...]} or
        None, "quality_label", "plots": [paths], "summary_path"}``.

    Raises:
        FileNotFoundError: ``logdir`` is missing or holds no MemWatch run.
    """
    root = Path(logdir)
    run_dirs = find_runs(root)
    if not run_dirs:
        raise FileNotFoundError(
            f"No MemWatch runs under {root}: expected TensorBoard event files with {mwlog.F_MEM} scalars "
            f"(and a {RUN_METADATA} per run giving n). Point LOGDIR at the directory that holds the runs."
        )
    sweep = _sweep_sizes(root)
    runs = []
    for directory in run_dirs:
        nested = [d for d in run_dirs if d != directory and directory in d.parents]
        run = load_run(directory, nested_runs=nested)
        if not run.records:
            warnings.warn(f"{directory}: no {mwlog.F_MEM} scalars; run left out.", UserWarning, stacklevel=2)
            continue
        if run.n is None:
            _fill_from_sweep(run, sweep)
        if run.n is None:
            warnings.warn(
                f"{directory} has no {RUN_METADATA} with n: its timescales are reported but it is left out of "
                f"the fit. Add one with lightning_memwatch.apps.report.write_run_metadata({str(directory)!r}, n=...).",
                UserWarning,
                stacklevel=2,
            )
        runs.append(run)
    if not runs:
        raise FileNotFoundError(f"No run under {root} holds {mwlog.F_MEM} scalars.")
    runs.sort(key=lambda r: (r.n is None, r.n or 0, str(r.run_dir)))
    if mixed := settings_differences(runs):
        warnings.warn(
            f"The runs under {root} were made with different settings ({mixed}): the tau_mem fit mixes them. "
            "Give each experiment its own folder (memwatch demo --out DIR), or point the report at one of them.",
            UserWarning,
            stacklevel=2,
        )
    entries = [summarize_run(run, detector, relative_to=root) for run in runs]
    fit, forecast = _fit(entries)
    summary: dict[str, Any] = {
        "logdir": str(root),
        "runs": entries,
        "fit": fit,
        "forecast": forecast,
        "quality_label": runs[0].quality_label,
        "plots": [],
    }
    if plots:
        summary["plots"] = [str(p) for p in write_plots(runs, summary, root / PLOTS_DIRNAME)]
    if write:
        path = root / SUMMARY_FILENAME
        tmp = root / f".{SUMMARY_FILENAME}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
        summary["summary_path"] = str(path)
    if echo is not None:
        echo(format_table(summary))
    return summary


def _fmt_step(value: Any) -> str:
    return "-" if value is None else f"{int(value)}"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(float(value), spec)


def format_table(summary: Mapping[str, Any]) -> str:
    """The printed table: one line per run (n, tau_gen, tau_mem, tau_mem / n, final f_mem, best quality,
    last step), then the fit and the forecast."""
    quality = "best FID" if summary.get("quality_label", "FID") == "FID" else "best FD"
    header = (
        f"{'n':>6} {'tau_gen':>8} {'tau_mem':>8} {'tau_mem/n':>10} {'final f_mem':>12} {quality:>9} {'steps':>7}"
    )
    lines = [f"memwatch report: {len(summary['runs'])} run(s) under {summary.get('logdir', '')}", header]
    for run in summary["runs"]:
        n, tau_mem = run["n"], run["tau_mem"]
        ratio = None if n is None or tau_mem is None else tau_mem / n
        lines.append(
            f"{'?' if n is None else n:>6} {_fmt_step(run['tau_gen']):>8} {_fmt_step(tau_mem):>8} "
            f"{_fmt(ratio, '.2f'):>10} {_fmt(run['final_f_mem'], '.4f'):>12} "
            f"{_fmt(run['best_fid'], '.3g'):>9} {_fmt_step(run['final_step']):>7}"
        )
    fit = summary["fit"]
    if fit.get("slope") is None:
        lines.append("fit: tau_mem = slope * n needs tau_mem at two or more distinct n (train longer, add runs)")
    else:
        lines.append(
            f"fit: tau_mem = {fit['slope']:.4g} * n (the paper's law, through the origin): R^2 = {fit['r2']:.3f}; "
            f"log-log exponent {fit['exponent']:.3f} (1 = linear)"
        )
        affine = fit.get("affine")
        if affine:
            lines.append(
                f"     with an intercept: tau_mem = {affine['intercept']:.4g} + {affine['slope']:.4g} * n: "
                f"R^2 = {affine['r2']:.3f}"
            )
    forecast = summary.get("forecast")
    if forecast:
        pairs = ", ".join(f"n={n}: {t:.0f} steps" for n, t in zip(forecast["n"], forecast["tau_mem"], strict=True))
        lines.append(f"forecast tau_mem: {pairs}")
    if summary.get("plots"):
        lines.append(f"plots: {Path(summary['plots'][0]).parent}/ ({len(summary['plots'])} PNG files)")
    if summary.get("summary_path"):
        lines.append(f"summary: {summary['summary_path']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas, no pyplot)


def _new_figure(ncols: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4 * ncols, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.85 * i / max(count - 1, 1)) for i in range(count)]


def _series(run: RunHistory, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in run.records:
        value = record.get(key)
        if value is not None and math.isfinite(float(value)):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def _plot_f_mem(
    runs: Sequence[RunHistory], entries: Sequence[Mapping[str, Any]], path: Path, *, per_n: bool
) -> None:
    fig, (ax,) = _new_figure()
    any_band = any_tau = False
    thresholds: set[tuple[str, float]] = set()
    for run, entry, color in zip(runs, entries, _colors(len(runs)), strict=True):
        scale = float(run.n) if per_n and run.n else 1.0
        steps, values = _series(run, "f_mem")
        if per_n:  # log axis: step 0 has no place on it
            keep = [i for i, s in enumerate(steps) if s > 0]
            steps, values = [steps[i] for i in keep], [values[i] for i in keep]
        x = [s / scale for s in steps]
        ax.plot(x, values, "-o", ms=2.5, color=color, label=run.label)
        lo, hi = _series(run, "f_mem_ci_low"), _series(run, "f_mem_ci_high")
        band = {s: (a, b) for s, a, b in zip(lo[0], lo[1], hi[1], strict=False)} if lo[0] == hi[0] else {}
        if band and all(s in band for s in steps):
            ax.fill_between(x, [band[s][0] for s in steps], [band[s][1] for s in steps], color=color, alpha=0.15,
                            lw=0, label="_band")
            any_band = True
        if entry["tau_mem"] is not None:
            ax.axvline(entry["tau_mem"] / scale, color=color, ls=":", lw=1)
            any_tau = True
        detector = entry["detector"]
        if detector.get("f0") is not None and detector.get("mem_rule") in ("threshold", "ci"):
            thresholds.add((detector["mem_rule"], float(detector["f0"])))
    for rule, f0 in sorted(thresholds):
        what = "f_mem" if rule == "threshold" else "the interval's lower end"
        ax.axhline(f0, color="grey", ls="--", lw=0.8, label=f"tau_mem threshold: {what} > {f0:g}")
    if any_band:
        ax.fill_between([], [], [], color="grey", alpha=0.15, lw=0, label="95% bootstrap interval of f_mem")
    if any_tau:
        ax.plot([], [], color="grey", ls=":", lw=1, label="tau_mem of the run (its colour)")
    if per_n:
        ax.set_xlabel("optimizer steps / n (training images)")
        ax.set_title("f_mem vs step / n (curves collapse if tau_mem is proportional to n)")
        ax.set_xscale("log")
    else:
        ax.set_xlabel("optimizer steps")
        ax.set_title("memorized fraction f_mem")
    ax.set_ylabel("f_mem (fraction of samples with d1/d2 < 1/3)")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend([h for h, t in zip(handles, labels) if t != "_band"], [t for t in labels if t != "_band"], fontsize=8)
    fig.savefig(path, dpi=110)


def _plot_quality(runs: Sequence[RunHistory], entries: Sequence[Mapping[str, Any]], path: Path) -> None:
    fig, (ax,) = _new_figure()
    any_values = False
    marks: set[str] = set()
    for run, entry, color in zip(runs, entries, _colors(len(runs)), strict=True):
        steps, values = _series(run, "fid")
        if not values:
            continue
        any_values = True
        ax.plot(steps, values, "-o", ms=2.5, color=color, label=run.label)
        if entry["tau_gen"] is not None:
            ax.axvline(entry["tau_gen"], color=color, ls=":", lw=1)
            marks.add("gen")
        if entry["tau_mem"] is not None:
            ax.axvline(entry["tau_mem"], color=color, ls="-.", lw=0.8)
            marks.add("mem")
    detector = entries[0]["detector"] if entries else {}
    if detector.get("gen_rule") == "floor" and detector.get("floor") is not None:
        limit = float(detector["floor"]) * (1.0 + float(detector.get("eps", 0.0)))
        ax.axhline(limit, color="grey", ls="--", lw=0.8, label=f"tau_gen threshold: quality <= {limit:.3g}")
    if "gen" in marks:
        ax.plot([], [], color="grey", ls=":", lw=1, label="tau_gen of the run (its colour)")
    if "mem" in marks:
        ax.plot([], [], color="grey", ls="-.", lw=0.8, label="tau_mem of the run (its colour)")
    if any_values:
        if min(v for r in runs for v in _series(r, "fid")[1]) > 0:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no quality values (FID off)", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel(runs[0].quality_label if runs else "FID")
    unflagged = [e for e in entries if e["tau_gen"] is None]
    gen = (
        "" if not unflagged
        else "; tau_gen: not flagged in any run" if len(unflagged) == len(entries)
        else "; tau_gen not flagged for " + ", ".join(f"n={e['n']}" for e in unflagged)
    )
    ax.set_title(f"sample quality (lower is better){gen}")
    fig.savefig(path, dpi=110)


def _plot_timescales(entries: Sequence[Mapping[str, Any]], fit: Mapping[str, Any], path: Path) -> None:
    fig, (lin, loglog) = _new_figure(2)
    usable = [e for e in entries if e["n"] is not None]
    for key, marker, color in (("tau_gen", "s", "tab:blue"), ("tau_mem", "o", "tab:red")):
        pts = [(e["n"], e[key]) for e in usable if e[key] is not None]
        if pts:
            for ax in (lin, loglog):
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, label=key, ms=6)
    if fit.get("slope") is not None and usable:
        top = max(e["n"] for e in usable)
        xs = [top * i / 50 for i in range(1, 56)]
        lin.plot(xs, [fit["slope"] * x for x in xs], "-", color="tab:red", lw=1,
                 label=f"tau_mem = {fit['slope']:.3g} n (R^2 = {fit['r2']:.3f})")
        if fit.get("prefactor") is not None:
            lo = min(e["n"] for e in usable)
            xs = [lo * (top / lo) ** (i / 40) for i in range(41)] if top > lo else [lo]
            loglog.plot(xs, [fit["prefactor"] * x ** fit["exponent"] for x in xs], "-", color="tab:red", lw=1,
                        label=f"tau_mem ~ n^{fit['exponent']:.2f}")
    for ax in (lin, loglog):
        ax.set_xlabel("n (training images)")
        ax.set_ylabel("optimizer steps")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    lin.set_xlim(left=0)
    lin.set_ylim(bottom=0)
    missing = [key for key in ("tau_gen", "tau_mem") if not any(e[key] is not None for e in usable)]
    shown = " and ".join(k for k in ("tau_gen", "tau_mem") if k not in missing) or "no timescale"
    lin.set_title(f"{shown} vs n" + "".join(f"; {key}: not flagged in any run" for key in missing))
    if any(e["tau_mem"] or e["tau_gen"] for e in usable):
        loglog.set_xscale("log")
        loglog.set_yscale("log")
    loglog.set_title("log-log: the exponent of tau_mem vs n")
    fig.savefig(path, dpi=110)


def _plot_forecast(
    entries: Sequence[Mapping[str, Any]],
    fit: Mapping[str, Any],
    forecast: Mapping[str, Any] | None,
    path: Path,
) -> None:
    fig, (ax,) = _new_figure()
    measured = [(e["n"], e["tau_mem"]) for e in entries if e["n"] is not None and e["tau_mem"] is not None]
    if measured:
        xs, ys = [m[0] for m in measured], [m[1] for m in measured]
        ax.plot(xs, ys, "o", color="tab:red", label="measured tau_mem")
    if forecast and fit.get("slope") is not None:
        top = max(forecast["n"])
        xs = [top * i / 100 for i in range(0, 101)]
        ax.plot(xs, [fit["slope"] * x for x in xs], "-", color="tab:red", lw=1,
                label=f"tau_mem = {fit['slope']:.3g} n (R^2 = {fit['r2']:.3f})")
        ax.plot(forecast["n"], forecast["tau_mem"], "x", color="black", ms=8, label="forecast")
        for n, tau in zip(forecast["n"], forecast["tau_mem"], strict=True):
            ax.annotate(f"{tau:,.0f}", (n, tau), textcoords="offset points", xytext=(-10, 8), fontsize=8)
        ax.set_title("stop before tau_mem: forecast for larger training sets")
    else:
        ax.text(0.5, 0.5, "no forecast: tau_mem needed at two or more n", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_title("tau_mem forecast")
    ax.set_xlabel("n (training images)")
    ax.set_ylabel("tau_mem (optimizer steps)")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def write_plots(
    runs: Sequence[RunHistory], summary: Mapping[str, Any], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Write the report's PNG plots (:data:`PLOT_NAMES`) into ``out_dir``; returns their paths.

    Args:
        runs: the runs, in the order of ``summary["runs"]``.
        summary: the summary built by :func:`report` (runs, fit, forecast).
        out_dir: destination directory (created).
    """
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    entries, fit = summary["runs"], summary["fit"]
    paths = [directory / name for name in PLOT_NAMES]
    _plot_f_mem(runs, entries, paths[0], per_n=False)
    _plot_f_mem(runs, entries, paths[1], per_n=True)
    _plot_quality(runs, entries, paths[2])
    _plot_timescales(entries, fit, paths[3])
    _plot_forecast(entries, fit, summary.get("forecast"), paths[4])
    return paths


# ------------------------------------------------------------------------------------------------------------
# command line


def _parse_setting(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"--detector takes KEY=VALUE (e.g. f0=0.03); got {text!r}.")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def build_parser() -> Any:
    """The ``memwatch report`` argument parser (argparse)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="memwatch report",
        description="Read MemWatch runs back from TensorBoard logs, flag tau_gen and tau_mem, fit tau_mem vs "
        "n, and write LOGDIR/summary.json and LOGDIR/plots/*.png.",
    )
    parser.add_argument("logdir", type=Path, help="directory of the runs (memwatch_run.json + event files)")
    parser.add_argument(
        "--detector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TimescaleDetector setting of every run, e.g. --detector mem_rule=threshold "
        "--detector f0=0.03 (repeatable)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``memwatch report LOGDIR [--detector KEY=VALUE ...] [--no-plots]``; returns the exit code (0)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    overrides = dict(_parse_setting(s) for s in args.detector)
    report(args.logdir, detector=overrides or None, plots=not args.no_plots)
    return 0

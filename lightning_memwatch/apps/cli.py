"""The ``memwatch`` command: ``fit`` (LightningCLI over the recipes), ``sweep``, ``demo`` and ``report``.

Usage::

    memwatch fit --config recipes/celeba_n_sweep.yaml [--data.init_args.n 2048 ...] [--print_config]
    memwatch sweep --config recipes/celeba_n_sweep.yaml --n 128 256 512 1024 [--out DIR] [--gpus auto]
    memwatch demo [--out runs/demo] [--quick] [--overwrite]
    memwatch report LOGDIR

``fit`` is Lightning's ``LightningCLI`` (any LightningModule / LightningDataModule by ``class_path``); it
saves the resolved configuration as ``config.yaml`` next to the TensorBoard logs (``trainer.log_dir``).
The recipes give :class:`~lightning_memwatch.MemWatch` ``data_range: null``, so it reads the datamodule's
``data_range`` at setup: the paper's centred CelebA lies in ``(-mean, 1 - mean)`` with the mean of the
training subset, known only once the data is loaded.

``sweep`` runs ``memwatch fit`` once per value (sequentially, one process each; with several GPUs, one
process per GPU at a time), each run under ``OUT/<name>/`` (TensorBoard logs in
``OUT/<name>/lightning_logs/version_0/``) with its ``memwatch_run.json`` (n, label, quality label: what
``memwatch report`` reads), and writes ``OUT/sweep.json`` listing every run (parameters, directory, exit
code, seconds). ``demo`` and ``report`` live in :mod:`lightning_memwatch.apps.demo` and
:mod:`lightning_memwatch.apps.report` (imported only when used; each exposes ``main(argv) -> int``).
Every command needs the ``[apps]`` extra (``pip install 'lightning-memwatch[apps]'``); without it ``memwatch``
exits with code 2 and names that command.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_memwatch.apps import APPS_INSTALL, missing_requirements

USAGE = """usage: memwatch {fit,sweep,demo,report} ...

  fit     train one recipe: memwatch fit --config recipes/<recipe>.yaml [--print_config] [overrides]
  sweep   run one recipe over several values: memwatch sweep --config X.yaml --n 128 256 512 [--gpus auto]
  demo    the offline CPU demo (scikit-learn digits): memwatch demo [--out runs/demo] [--quick] [--overwrite]
  report  read a sweep's logs back, write summary.json and plots: memwatch report LOGDIR

Run `memwatch <command> --help` for the options of one command.
"""

_SHORT_NAMES = {"n": "n", "base_width": "W", "dim": "d"}


# ---------------------------------------------------------------------------------------------- fit
class RecipeCLI(LightningCLI):
    """LightningCLI for the recipes: any module/datamodule by ``class_path``.

    Recipes give MemWatch ``data_range: null``: it then reads the datamodule's ``data_range`` at setup (e.g.
    ``(-mean, 1 - mean)`` for the paper's centred CelebA, known only once the data is loaded).
    """


def run_fit(argv: Sequence[str] | None) -> int:
    """``memwatch fit ARGS``: LightningCLI's ``fit`` subcommand (``--print_config``, ``--help`` exit early).

    ``argv=None`` parses ``sys.argv[1:]`` (which starts with ``fit``) as the console script does.
    """
    with warnings.catch_warnings():
        # main(argv) from Python (tests, scripts) passes args while sys.argv holds the caller's own arguments
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        RecipeCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            args=None if argv is None else ["fit", *argv],
        )
    return 0


# ---------------------------------------------------------------------------------------------- sweep
def _parse_set(spec: str) -> tuple[tuple[str, ...], list[str]]:
    keys, sep, values = spec.partition("=")
    names = tuple(k.strip() for k in keys.split(",") if k.strip())
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not names or not items:
        raise argparse.ArgumentTypeError(f"--set expects KEY[,KEY2]=V1,V2,...; got {spec!r}.")
    return names, items


def _run_name(point: dict[tuple[str, ...], str]) -> str:
    parts = []
    for keys, value in point.items():
        leaf = keys[0].rsplit(".", 1)[-1]
        parts.append(f"{_SHORT_NAMES.get(leaf, leaf)}{value}")
    return "_".join(parts)


def plan_sweep(
    config: str, grid: dict[tuple[str, ...], list[str]], out: Path, extra: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """One run per point of the cartesian ``grid``: name, parameters, directory and ``memwatch fit`` argv.

    ``grid`` maps a tuple of config keys (set together to one value, e.g. the data's and the model's
    ``dim``) to the values they take.
    """
    runs = []
    axes = list(grid)
    for values in itertools.product(*(grid[a] for a in axes)):
        point = dict(zip(axes, values, strict=True))
        name = _run_name(point)
        run_dir = out / name
        argv = ["fit", "--config", config]
        params: dict[str, str] = {}
        for keys, value in point.items():
            for key in keys:
                argv += [f"--{key}", value]
                params[key] = value
        argv += ["--trainer.default_root_dir", str(run_dir), *extra]
        runs.append({"name": name, "params": params, "dir": str(run_dir), "argv": argv})
    return runs


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _quality_label(config_tree: Any) -> str | None:
    """What ``memwatch/fid`` holds for this recipe: Inception FID or a Frechet distance in other features."""
    for callback in _lookup(config_tree, "trainer.callbacks") or []:
        if not isinstance(callback, dict) or not str(callback.get("class_path", "")).endswith("MemWatch"):
            continue
        fid = (callback.get("init_args") or {}).get("fid")
        if not isinstance(fid, dict):
            return None
        extractor = fid.get("feature_extractor", "inception")
        if extractor in (None, "inception"):
            return "FID"
        name = extractor.get("class_path", "custom") if isinstance(extractor, dict) else str(extractor)
        return f"Frechet distance ({name.rsplit('.', 1)[-1]} features)"
    return None


def run_metadata(config: str, run: dict[str, Any], extra: Sequence[str] = ()) -> dict[str, Any]:
    """``memwatch_run.json`` fields of one sweep run (read by ``memwatch report``): n, label, quality label."""
    import yaml

    tree = yaml.safe_load(Path(config).read_text()) or {}
    n = run["params"].get("data.init_args.n", _lookup(tree, "data.init_args.n"))
    extra = list(extra)
    for flag in ("--data.init_args.n", "--data.n"):
        if flag in extra[:-1]:
            n = extra[extra.index(flag) + 1]
    fields: dict[str, Any] = {"n": None if n is None else int(n), "label": run["name"], "config": config}
    fields["sweep"] = dict(run["params"])
    quality = _quality_label(tree)
    if quality is not None:
        fields["quality_label"] = quality
    return fields


def _write_manifest(out: Path, config: str, runs: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "config": config,
        "runs": [{k: v for k, v in r.items() if k != "argv"} | {"command": _command(r)} for r in runs],
    }
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "sweep.json")


def _command(run: dict[str, Any]) -> str:
    return " ".join(["memwatch", *run["argv"]])


def _gpu_list(spec: list[str] | None) -> list[str]:
    if not spec:
        return []
    if spec == ["auto"]:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    return [s for item in spec for s in item.split(",") if s]


def _launch(run: dict[str, Any], gpu: str | None, stream: bool) -> tuple[subprocess.Popen, Any]:
    run_dir = Path(run["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    argv = list(run["argv"])
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
        argv += ["--trainer.devices", "1"]
    cmd = [sys.executable, "-m", "lightning_memwatch.apps.cli", *argv]
    log = open(run_dir / "fit.log", "w")  # noqa: SIM115 (closed when the process ends)
    if stream:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    else:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def _wait_streaming(proc: subprocess.Popen, log: Any) -> int:
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        log.write(line)
    return proc.wait()


def run_sweep(argv: Sequence[str]) -> int:
    """``memwatch sweep``: run one recipe over several values of ``n`` (or any ``--set KEY=V1,V2``)."""
    parser = argparse.ArgumentParser(
        prog="memwatch sweep",
        allow_abbrev=False,
        description="Run `memwatch fit --config CONFIG` once per value (cartesian product over --n/--set). "
        "Arguments after `--` are passed to every run (e.g. -- --trainer.max_steps 1000).",
    )
    parser.add_argument("--config", required=True, help="recipe YAML")
    parser.add_argument("--n", nargs="+", default=None, help="training set sizes (sets data.init_args.n)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        type=_parse_set,
        default=[],
        metavar="KEY[,KEY2]=V1,V2",
        help="another swept key, e.g. model.init_args.denoiser.init_args.base_width=16,32,64; keys listed "
        "before '=' take the same value (data.init_args.dim,model.init_args.denoiser.init_args.dim=8,16)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: runs/<config name>)")
    parser.add_argument(
        "--gpus", nargs="+", default=None, help="GPU ids to spread runs over (one process per GPU), or 'auto'"
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args, extra = parser.parse_known_args(list(argv))
    if extra and extra[0] == "--":
        extra = extra[1:]
    grid: dict[tuple[str, ...], list[str]] = {}
    if args.n:
        grid[("data.init_args.n",)] = [str(v) for v in args.n]
    for keys, values in args.sets:
        grid[keys] = values
    if not grid:
        parser.error("give the values to sweep: --n 128 256 ... and/or --set KEY=V1,V2")
    if not Path(args.config).is_file():
        parser.error(f"config file not found: {args.config}")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    runs = plan_sweep(args.config, grid, out, extra)
    if args.dry_run:
        for run in runs:
            print(_command(run))
        return 0

    gpus = _gpu_list(args.gpus)
    from tqdm.auto import tqdm

    _write_manifest(out, args.config, runs)
    from lightning_memwatch.apps.report import write_run_metadata

    for run in runs:
        if (Path(run["dir"]) / "lightning_logs").exists():
            print(f"memwatch sweep: {run['dir']} already holds logs; this run adds a new version beside them.")
        meta = run_metadata(args.config, run, extra)
        write_run_metadata(run["dir"], n=meta.pop("n"), **meta)
    failed = 0
    bar = tqdm(total=len(runs), desc="memwatch sweep", unit="run", disable=len(runs) < 2)
    if len(gpus) <= 1:
        for run in runs:
            tqdm.write(f"memwatch sweep: {run['name']} -> {run['dir']}")
            start = time.perf_counter()
            proc, log = _launch(run, gpus[0] if gpus else None, stream=True)
            with log:
                run["returncode"] = _wait_streaming(proc, log)
            run["seconds"] = round(time.perf_counter() - start, 1)
            failed += run["returncode"] != 0
            _write_manifest(out, args.config, runs)
            bar.update(1)
    else:
        pending = list(runs)
        active: dict[str, tuple[dict[str, Any], subprocess.Popen, Any, float]] = {}
        while pending or active:
            for gpu in gpus:
                if gpu not in active and pending:
                    run = pending.pop(0)
                    tqdm.write(f"memwatch sweep: {run['name']} on GPU {gpu} (log: {run['dir']}/fit.log)")
                    proc, log = _launch(run, gpu, stream=False)
                    active[gpu] = (run, proc, log, time.perf_counter())
            for gpu, (run, proc, log, start) in list(active.items()):
                if proc.poll() is not None:
                    log.close()
                    run["returncode"], run["seconds"] = proc.returncode, round(time.perf_counter() - start, 1)
                    failed += proc.returncode != 0
                    del active[gpu]
                    _write_manifest(out, args.config, runs)
                    bar.update(1)
            time.sleep(1.0)
    bar.close()
    print(f"memwatch sweep: {len(runs) - failed}/{len(runs)} runs succeeded; manifest {out / 'sweep.json'}")
    print(f"  next: memwatch report {out}    (TensorBoard: tensorboard --logdir {out})")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------- demo, report
def _run_lazy(command: str, argv: Sequence[str]) -> int:
    module_name = f"lightning_memwatch.apps.{command}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        print(
            f"memwatch {command}: this installation has no {module_name} module, so `memwatch {command}` is "
            "unavailable. Reinstall lightning-memwatch from a complete checkout (`pip install -e .`).",
            file=sys.stderr,
        )
        return 2
    return int(module.main(list(argv)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memwatch`` console script; returns the exit code.

    Without the ``[apps]`` extra every command exits with code 2 and says how to install it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    missing = missing_requirements()
    if missing and command in ("fit", "sweep", "demo", "report"):
        print(
            f"memwatch {command}: the memwatch command needs the [apps] extra, and this environment lacks "
            f"{', '.join(missing)}. Install it with: {APPS_INSTALL}",
            file=sys.stderr,
        )
        return 2
    if command == "fit":
        return run_fit(None if argv is None else rest)
    if command == "sweep":
        return run_sweep(rest)
    if command in ("demo", "report"):
        return _run_lazy(command, rest)
    print(f"memwatch: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

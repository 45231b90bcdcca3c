"""The core without the ``[apps]`` extra, in a process of its own; launched by tests/test_layout.py.

Usage: python _without_apps.py OUTDIR

Before anything else it hides the extra's packages as if they were not installed: their imports fail
(``sys.modules[name] = None``) and their distribution metadata is absent (``importlib.metadata`` raises
PackageNotFoundError, which is what Lightning's optional-import checks read). Then, in the same process (one
interpreter start serves both checks),

* the fit: imports lightning_memwatch, builds MemWatch (TensorBoard logger, image logging on) and
  MemorizationEarlyStopping and runs a tiny fit of the test toy that starts copying its training images;
  it records which application modules that imported;
* the command: runs the ``memwatch`` entry point for ``demo`` and ``report``, which must exit with code 2;

and writes ``OUTDIR/result.json``: what happened (``fit``, ``cli``) and whether the hidden packages stayed hidden.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

HIDDEN_MODULES = ("sklearn", "matplotlib", "jsonargparse", "docstring_parser", "typeshed_client")
HIDDEN_DISTRIBUTIONS = {"scikit-learn", "matplotlib", "jsonargparse", "docstring-parser", "typeshed-client"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def hide_the_apps_extra() -> None:
    for name in HIDDEN_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ModuleNotFoundError
    original = importlib.metadata.Distribution.from_name.__func__  # type: ignore[attr-defined]

    def from_name(cls, name: str):  # noqa: ANN001, ANN202
        if _canonical(name) in HIDDEN_DISTRIBUTIONS:
            raise importlib.metadata.PackageNotFoundError(name)
        return original(cls, name)

    importlib.metadata.Distribution.from_name = classmethod(from_name)  # type: ignore[method-assign]


hide_the_apps_extra()

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402


def run_fit(out: Path) -> dict:
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import TensorBoardLogger
    from toys import ToyDiffusion, toy_images, toy_loader

    import lightning_memwatch
    from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector

    train = toy_images(32, seed=0)
    model = ToyDiffusion(train, memorize_from=20)
    watch = MemWatch(
        train_data=train,
        num_samples=16,
        sample_batch_size=16,
        schedule=EvalSchedule.every(5),
        bootstrap=50,
        data_range=(-1.0, 1.0),
        verbose=False,
        log_images=True,
        metrics={"quality": lambda generated: float(generated.abs().mean())},  # no FID: its weights are offline
        detector=TimescaleDetector(quality_key="quality", mem_rule="threshold", f0=0.5),
    )
    stopper = MemorizationEarlyStopping(watch, monitor="quality")
    trainer = Trainer(
        max_steps=60,
        callbacks=[watch, stopper],
        logger=TensorBoardLogger(str(out), name="tb"),
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.fit(model, toy_loader(train))
    return {
        "version": lightning_memwatch.__version__,
        "f_mem": [record["f_mem"] for record in watch.history],
        "tau_mem": watch.tau_mem,
        "stopped_step": stopper.stopped_step,
        "global_step": trainer.global_step,
        "event_files": len(list(out.rglob("events.out.tfevents.*"))),
    }


def run_cli() -> dict:
    from lightning_memwatch.apps.cli import main

    result = {}
    for command in ("demo", "report"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([command, "--help"])
        result[command] = {"code": code, "stderr": err.getvalue()}
    return result


def imported_apps() -> list[str]:
    return sorted(
        name for name in sys.modules if name.startswith("lightning_memwatch.apps") and sys.modules[name] is not None
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    outdir = Path(sys.argv[1])
    result = {"fit": run_fit(outdir)}
    result["fit"]["imported"] = imported_apps()  # before the command imports lightning_memwatch.apps.cli
    result["cli"] = run_cli()
    result["hidden_importable"] = [name for name in HIDDEN_MODULES if sys.modules.get(name) is not None]
    (outdir / "result.json").write_text(json.dumps(result))

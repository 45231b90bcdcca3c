"""What each light module of the core imports, checked in one fresh process; launched by tests/test_import_purity.py.

Usage: python _import_stages.py OUT.json

One interpreter start (torch's import alone takes seconds) serves every check: the stages run in an order in
which each imports at most what the next is allowed to, so that "module X did not import Y" is still read off
``sys.modules`` of a process where nothing else imported Y first:

1. ``record``: neither torch, numpy nor Lightning;
   ``detection``: the timescale rules and their argument checks (``_arguments``): neither torch, numpy nor Lightning;
2. ``checks``: the error helpers, used without raising: no Lightning;
3. ``frechet``: the Frechet maths: no Lightning, neither the FID module nor the feature extractors;
4. ``images``: the one reader of image sources: no Lightning;
5. ``evaluator``: the Lightning-free evaluation core, run with every Lightning import made to fail;
6. ``checks_error``: raising a config error imports Lightning then, and the error is its MisconfigurationException;
7. ``adapters``: the package, its adapters and the MemWatch callback import no optional sampler package.

A stage that raises records its traceback and the later stages still run. ``OUT.json`` maps each stage to
``{"error", "loaded", "value"}``: ``loaded`` lists the watched packages and ``lightning_memwatch`` modules in
``sys.modules`` after the stage.
"""

from __future__ import annotations

import json
import sys
import traceback

WATCHED = ("torch", "numpy", "lightning", "pytorch_lightning", "diffusers", "denoising_diffusion_pytorch")
LIGHTNING = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def loaded() -> list[str]:
    """Watched top-level packages and lightning_memwatch modules that are really imported (not blocked)."""
    names = {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None and m.split(".")[0] in WATCHED}
    ours = {m for m in sys.modules if m.startswith("lightning_memwatch.") and sys.modules[m] is not None}
    return sorted(names | ours)


def stage_record() -> None:
    import lightning_memwatch.record  # noqa: F401


def stage_detection() -> list:
    from lightning_memwatch.detection import TimescaleDetector

    detector = TimescaleDetector(patience=2, rel_tol=0.1)
    detector.update({"step": 1, "f_mem": 0.0, "f_mem_ci_low": 0.0, "fid": 10.0})
    return [detector.patience, detector.num_records]


def stage_checks() -> None:
    from lightning_memwatch import _checks

    _checks.check_int(3, "n", minimum=1)


def stage_frechet() -> float:
    import torch

    from lightning_memwatch.metrics.frechet import feature_statistics, frechet_distance

    mu, cov = feature_statistics(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)))
    return float(frechet_distance(mu, cov, mu, cov))


def stage_images() -> int:
    import torch

    from lightning_memwatch.images import collect_images

    return len(collect_images(torch.utils.data.TensorDataset(torch.zeros(3, 1, 2, 2))))


def stage_evaluator() -> list:
    import torch

    blocked = [name for name in LIGHTNING if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]  # any import of Lightning now fails
    try:
        from lightning_memwatch.evaluator import Evaluator

        train = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        record = Evaluator(train, data_range=(0.0, 1.0), bootstrap=10).evaluate(train[:4].clone(), step=3)
        return [record.step, record.f_mem]
    finally:
        for name in blocked:
            del sys.modules[name]


def stage_checks_error() -> dict[str, bool]:
    from lightning_memwatch import _checks

    before = "lightning" in loaded()
    try:
        _checks.check_int(0, "n", minimum=1)
    except ValueError as err:
        from lightning.pytorch.utilities.exceptions import MisconfigurationException

        return {"lightning_before": before, "misconfiguration": isinstance(err, MisconfigurationException)}
    raise AssertionError("check_int(0, minimum=1) raised nothing")


def stage_adapters() -> None:
    import lightning_memwatch
    import lightning_memwatch.adapters as adapters
    import lightning_memwatch.callbacks.memwatch  # noqa: F401

    adapters.DiffusersSampler, adapters.LucidrainsSampler, adapters.GlobalRNGSampler  # noqa: B018
    lightning_memwatch.MemWatch  # noqa: B018


STAGES = {
    "record": stage_record,
    "detection": stage_detection,
    "checks": stage_checks,
    "frechet": stage_frechet,
    "images": stage_images,
    "evaluator": stage_evaluator,
    "checks_error": stage_checks_error,
    "adapters": stage_adapters,
}


if __name__ == "__main__":
    report = {}
    for name, stage in STAGES.items():
        try:
            value, error = stage(), None
        except BaseException:  # noqa: BLE001 - every stage reports, whatever the one before did
            value, error = None, traceback.format_exc()
        report[name] = {"error": error, "loaded": loaded(), "value": value}
    with open(sys.argv[1], "w") as fh:
        json.dump(report, fh, indent=1)

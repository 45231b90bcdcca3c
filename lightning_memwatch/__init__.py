"""lightning_memwatch: Lightning callbacks that watch a diffusion model generalize, then memorize.

Public names only, imported lazily so that ``lightning_memwatch.metrics`` stays usable without Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_memwatch import _moved

__version__ = "0.1.0"

_moved.install()  # old paths of the applications (lightning_memwatch.models, .demo, ...) -> lightning_memwatch.apps

_EXPORTS = {
    "AdaptiveSchedule": "lightning_memwatch.adaptive",
    "LossGapProbe": "lightning_memwatch.callbacks.probe",
    "MemWatch": "lightning_memwatch.callbacks.memwatch",
    "MemorizationEarlyStopping": "lightning_memwatch.callbacks.early_stopping",
    "EvalRecord": "lightning_memwatch.record",
    "EvalSchedule": "lightning_memwatch.schedule",
    "Evaluator": "lightning_memwatch.evaluator",
    "FID": "lightning_memwatch.metrics.fid",
    "NearestNeighbourIndex": "lightning_memwatch.metrics.knn",
    "MemorizationFraction": "lightning_memwatch.metrics.memorization",
    "MemorizationResult": "lightning_memwatch.metrics.memorization",
    "memorization_fraction": "lightning_memwatch.metrics.memorization",
    "memorization_ratios": "lightning_memwatch.metrics.memorization",
    "TimescaleDetector": "lightning_memwatch.detection",
    "TimescaleEvent": "lightning_memwatch.detection",
    "detect_timescales": "lightning_memwatch.detection",
    "forecast_tau_mem": "lightning_memwatch.fits",
    "ModuleEMA": "lightning_memwatch.weights",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_memwatch.adaptive import AdaptiveSchedule
    from lightning_memwatch.callbacks.early_stopping import MemorizationEarlyStopping
    from lightning_memwatch.callbacks.memwatch import MemWatch
    from lightning_memwatch.callbacks.probe import LossGapProbe
    from lightning_memwatch.detection import TimescaleDetector, TimescaleEvent, detect_timescales
    from lightning_memwatch.evaluator import Evaluator
    from lightning_memwatch.fits import forecast_tau_mem
    from lightning_memwatch.metrics.fid import FID
    from lightning_memwatch.metrics.knn import NearestNeighbourIndex
    from lightning_memwatch.metrics.memorization import (
        MemorizationFraction,
        MemorizationResult,
        memorization_fraction,
        memorization_ratios,
    )
    from lightning_memwatch.record import EvalRecord
    from lightning_memwatch.schedule import EvalSchedule
    from lightning_memwatch.weights import ModuleEMA


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_memwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

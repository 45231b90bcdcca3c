"""The maths of lightning_memwatch: pure torch/faiss, no Lightning import.

* :mod:`~lightning_memwatch.metrics.knn`: exact nearest-neighbour index (faiss GPU/CPU, blocked torch).
* :mod:`~lightning_memwatch.metrics.memorization`: d1/d2 ratios, f_mem with its interval, a torchmetrics Metric.
* :mod:`~lightning_memwatch.metrics.frechet`: the Fréchet distance maths (statistics, running moments, matrix
  square root, distance), float64.
* :mod:`~lightning_memwatch.metrics.features` and :mod:`~lightning_memwatch.metrics.fid`: feature extractors,
  FID settings and the evaluator with its reference statistics.
"""

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends
from lightning_memwatch.metrics.memorization import (
    MemorizationFraction,
    MemorizationResult,
    memorization_fraction,
    memorization_ratios,
)

__all__ = [
    "MemorizationFraction",
    "MemorizationResult",
    "NearestNeighbourIndex",
    "available_backends",
    "memorization_fraction",
    "memorization_ratios",
]

"""The memorization ratio d1/d2 of generated samples and the memorized fraction f_mem.

A generated sample ``x`` with nearest and second-nearest training examples ``a1``, ``a2`` (L2 distance, in the
index's space: flattened pixels, or ``feature_fn`` features) has ratio ``r = ||x - a1|| / ||x - a2||`` in
``[0, 1]``; it is *memorized* when ``r < threshold`` (1/3 in the paper, after Yoon et al. 2023). ``f_mem`` is the
fraction of memorized samples.

Decisions:

* ``d2 = 0`` can only happen when the index kept exact duplicates (``dedupe=False``) and the sample copies one
  of them; then ``d1 = 0`` too and the ratio is defined as 0 (a copy is memorized). Ratios are never NaN.
* ``fraction`` is the plain sample fraction (``memorized / m``), not the bootstrap mean.
* The confidence interval is the percentile bootstrap over samples of the authors' code (``bootstrap``
  resamples, seeded). Resampling ``m`` samples with replacement from ``c`` memorized ones gives a
  ``Binomial(m, c/m)`` count, so the resampled fractions are drawn from that distribution directly (same law,
  O(bootstrap) time). When 0 (or all) of the samples are memorized, every resample is identical and the bootstrap
  interval collapses to a point, which would claim certainty that ``m`` samples cannot give. There the open
  side uses the exact Clopper-Pearson bound: 0 of ``m`` gives ``(0, 1 - (alpha/2)**(1/m))`` (``ci_low`` stays
  exactly 0, so "ci_low > 0" rules never fire), ``m`` of ``m`` gives ``((alpha/2)**(1/m), 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torchmetrics
from torch import Tensor

from lightning_memwatch._checks import (
    check_batch,
    check_float,
    check_int,
    check_sample_range,
    config_error,
    config_type_error,
)
from lightning_memwatch.metrics.knn import NearestNeighbourIndex
from lightning_memwatch.value_check import ValueProfile, check_against_train, check_values

__all__ = [
    "KnnIndex",
    "MemorizationFraction",
    "MemorizationResult",
    "memorization_fraction",
    "memorization_ratios",
]

DEFAULT_THRESHOLD = 1.0 / 3.0


@runtime_checkable
class KnnIndex(Protocol):
    """What f_mem needs of a nearest-neighbour index of the training images.

    :class:`~lightning_memwatch.NearestNeighbourIndex` (one process) and
    :class:`~lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex` (rows split over a process
    group; its methods are collectives, so every rank calls them) both satisfy it. An index may also have
    ``sample_shape`` (per-sample shape of the training images, checked against the samples), ``backend``,
    ``dim``, ``device``, ``num_duplicates`` and ``holds_images``.
    """

    num_train: int
    """Distinct training rows indexed."""

    def search(self, queries: Tensor, k: int = 2) -> tuple[Tensor, Tensor]:
        """``(distances, indices)``, both ``(m, k)``: L2 distances (ascending) and training rows, nearest first."""
        ...

    def train_images(self, indices: Tensor) -> Tensor:
        """The training images at rows ``indices`` (as :meth:`search` returns them)."""
        ...


@dataclass(frozen=True, eq=False)
class MemorizationResult:
    """f_mem of one batch of generated samples, with its per-sample evidence.

    Attributes:
        fraction: memorized samples / samples, in [0, 1].
        ci_low: lower end of the confidence interval of ``fraction`` (exactly 0 when none is memorized).
        ci_high: upper end of the confidence interval.
        threshold: a sample is memorized when its ratio is strictly below this.
        ratios: ``(m,)`` float32 ratios d1/d2 in [0, 1].
        distances: ``(m, 2)`` float32 L2 distances to the nearest and second-nearest training examples.
        nn_indices: ``(m, 2)`` int64 rows of the original training set, nearest first.
        memorized: ``(m,)`` bool mask, ``ratios < threshold``.
    """

    fraction: float
    ci_low: float
    ci_high: float
    threshold: float
    ratios: Tensor
    distances: Tensor
    nn_indices: Tensor
    memorized: Tensor

    @property
    def num_samples(self) -> int:
        """Number of generated samples (images) measured."""
        return int(self.ratios.shape[0])

    @property
    def num_memorized(self) -> int:
        """Number of memorized samples (images)."""
        return int(self.memorized.sum())


def _as_index(index_or_train: KnnIndex | Tensor) -> KnnIndex:
    if isinstance(index_or_train, Tensor):
        return NearestNeighbourIndex(index_or_train)
    if isinstance(index_or_train, KnnIndex):
        return index_or_train
    raise config_type_error(
        "index_or_train must be a NearestNeighbourIndex or the training set as a tensor (or another index with "
        f"`num_train`, `search` and `train_images`, see KnnIndex); got {type(index_or_train).__name__}."
    )


def _sample_shape(index_or_train: KnnIndex | Tensor) -> tuple[int, ...] | None:
    """Per-sample shape of the training images, when known (the index may record it)."""
    if isinstance(index_or_train, Tensor):
        return tuple(index_or_train.shape[1:])
    shape = getattr(index_or_train, "sample_shape", None)
    return None if shape is None else tuple(shape)


def check_sample_shape(generated: Tensor, shape: tuple[int, ...] | None) -> None:
    """Raise unless each generated sample has the training images' shape (not only their size)."""
    if shape is None or not isinstance(generated, Tensor) or generated.ndim < 1:
        return
    if tuple(generated.shape[1:]) != tuple(shape):
        hint = ""
        if sorted(generated.shape[1:]) == sorted(shape):
            hint = " (the same values in another layout, e.g. channels-last: permute them back, e.g. " \
                   "`x.permute(0, 3, 1, 2)`)"
        raise config_error(
            f"generated samples have shape {tuple(generated.shape[1:])} per sample but the training images "
            f"{tuple(shape)}{hint}. Pass samples shaped like the training images: flattened pixels of another "
            "layout would be compared with the wrong pixels."
        )


def _neighbours(
    generated: Tensor, index_or_train: KnnIndex | Tensor, shape: tuple[int, ...] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Ratios, distances and nn indices, on ``generated``'s device."""
    if not isinstance(index_or_train, NearestNeighbourIndex):
        check_batch(generated, "generated")  # fail before building an index; the search checks it otherwise
    check_sample_shape(generated, shape if shape is not None else _sample_shape(index_or_train))
    if isinstance(index_or_train, Tensor):  # the samples' values against the training images' (value_check)
        check_against_train(generated, index_or_train)
    index = _as_index(index_or_train)
    if isinstance(index, NearestNeighbourIndex):  # its errors then name the samples "generated"
        distances, nn_indices = index.search(generated, 2, name="generated")
    else:
        distances, nn_indices = index.search(generated, 2)
    d1, d2 = distances[:, 0], distances[:, 1]
    ratios = torch.where(d2 > 0, d1 / torch.where(d2 > 0, d2, torch.ones_like(d2)), torch.zeros_like(d1))
    device = generated.device
    return ratios.to(device), distances.to(device), nn_indices.to(device)


def memorization_ratios(generated: Tensor, index_or_train: KnnIndex | Tensor) -> Tensor:
    """Per-sample ratio d1/d2 of the distances to the nearest and second-nearest training examples.

    Args:
        generated: ``(m, ...)`` floating-point samples shaped like the training images, ``m >= 1``.
        index_or_train: a built :class:`NearestNeighbourIndex` (reuse it across evaluations), or the training
            set itself (an index with default settings is then built for this call).

    Returns:
        ``(m,)`` float32 ratios in [0, 1] on ``generated``'s device; 0 for an exact copy.

    Example:
        >>> train = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 9.0]])
        >>> memorization_ratios(torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 0.0]]), train).tolist()
        [0.0, 1.0, 0.3333333432674408]
    """
    return _neighbours(generated, index_or_train)[0]


def memorization_fraction(
    generated: Tensor,
    index_or_train: KnnIndex | Tensor,
    threshold: float = DEFAULT_THRESHOLD,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> MemorizationResult:
    """f_mem of ``generated``: the fraction with ratio d1/d2 < ``threshold``, with a bootstrap interval.

    Args:
        generated: ``(m, ...)`` floating-point samples shaped like the training images, ``m >= 1``.
        index_or_train: a :class:`NearestNeighbourIndex` (or any :class:`KnnIndex`, e.g. a sharded one: every
            rank then calls this with the same samples), or the training set as a tensor.
        threshold: memorization threshold on the ratio, in (0, 1]; the paper uses 1/3.
        bootstrap: number of bootstrap resamples (>= 1) for the confidence interval.
        seed: seed of the bootstrap's random generator (results are reproducible).
        confidence: two-sided confidence level of the interval, in (0, 1).

    Returns:
        A :class:`MemorizationResult`; see the module notes for the interval at 0 or ``m`` memorized.

    Raises:
        ConfigError: (a ``ValueError``) given the training set as a tensor, samples on another scale than it:
            mostly or far outside the range of its values (e.g. copies in [0, 255] of images in [0, 1]), or on
            another part of it (e.g. copies in [0, 1] of images in [-1, 1]; see
            :mod:`lightning_memwatch.value_check`). Their ratios would all be near 1.

    Example:
        >>> train = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 9.0]])
        >>> result = memorization_fraction(torch.tensor([[0.0, 0.1], [2.0, 0.0]]), train)
        >>> result.fraction, result.memorized.tolist()
        (0.5, [True, False])
    """
    threshold = check_float(threshold, "threshold", low=0, low_open=True, high=1, hint="the paper uses 1/3")
    bootstrap = check_int(bootstrap, "bootstrap", minimum=1, unit="number of resamples, e.g. 1000")
    if not 0 < confidence < 1:
        raise config_error(f"confidence must lie in (0, 1), e.g. 0.95; got {confidence!r}.")
    ratios, distances, nn_indices = _neighbours(generated, index_or_train)
    memorized = ratios < threshold
    m, count = len(ratios), int(memorized.sum())
    ci_low, ci_high = _fraction_interval(count, m, bootstrap=bootstrap, seed=seed, confidence=confidence)
    return MemorizationResult(
        fraction=count / m,
        ci_low=ci_low,
        ci_high=ci_high,
        threshold=float(threshold),
        ratios=ratios,
        distances=distances,
        nn_indices=nn_indices,
        memorized=memorized,
    )


def _fraction_interval(count: int, m: int, *, bootstrap: int, seed: int, confidence: float) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``count / m``; exact Clopper-Pearson end where the bootstrap collapses."""
    alpha = 1.0 - confidence
    if count == 0:
        return 0.0, 1.0 - (alpha / 2) ** (1.0 / m)
    if count == m:
        return (alpha / 2) ** (1.0 / m), 1.0
    rng = np.random.default_rng(seed)
    resampled = rng.binomial(m, count / m, size=bootstrap) / m
    low, high = np.percentile(resampled, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


class MemorizationFraction(torchmetrics.Metric):
    """torchmetrics f_mem: memorized samples / samples, accumulated over ``update`` calls and DDP ranks.

    States are two counts summed across processes, so the result under DDP equals the fraction over the
    union of all ranks' samples.

    Args:
        index_or_train: a :class:`NearestNeighbourIndex` (shared, not copied to the metric's device), or the
            training set as a tensor (an index with default settings is built once here).
        threshold: memorization threshold on the ratio d1/d2, in (0, 1].
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> train = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 9.0]])
        >>> metric = MemorizationFraction(train)
        >>> metric.update(torch.tensor([[0.0, 0.1]]))
        >>> metric.update(torch.tensor([[2.0, 0.0]]))
        >>> float(metric.compute())
        0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    memorized: Tensor
    total: Tensor

    def __init__(
        self,
        index_or_train: NearestNeighbourIndex | Tensor,
        threshold: float = DEFAULT_THRESHOLD,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        threshold = check_float(threshold, "threshold", low=0, low_open=True, high=1, hint="the paper uses 1/3")
        self.sample_shape = _sample_shape(index_or_train)
        # the training images' values, when given as a tensor: each batch is checked against them
        self._values: ValueProfile | None = None
        if isinstance(index_or_train, Tensor) and len(index_or_train) and torch.is_floating_point(index_or_train):
            self._values = ValueProfile.of(index_or_train)
        self.index = _as_index(index_or_train)
        self.threshold = float(threshold)
        self.add_state("memorized", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, generated: Tensor) -> None:
        """Add a batch of generated samples ``(m, ...)``, shaped like the training images."""
        if self._values is not None and isinstance(generated, Tensor) and torch.is_floating_point(generated):
            values = self._values
            if values.high > values.low:
                check_sample_range(generated, "generated", (values.low, values.high))
                check_values(generated, values, "generated")
        ratios = _neighbours(generated, self.index, self.sample_shape)[0]
        self.memorized += (ratios < self.threshold).sum().to(self.memorized.device)
        self.total += len(ratios)

    def compute(self) -> Tensor:
        """The memorized fraction, a float32 scalar tensor in [0, 1]."""
        if int(self.total) == 0:
            raise RuntimeError(
                "MemorizationFraction.compute() was called before any generated samples were added: "
                "call update(generated) first."
            )
        return self.memorized.to(torch.float32) / self.total.to(torch.float32)

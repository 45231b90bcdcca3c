"""Evaluator: samples in, :class:`~lightning_memwatch.EvalRecord` out. No Lightning import.

The evaluation core that :class:`~lightning_memwatch.MemWatch` calls after each sampling pass, usable as it
is from a plain PyTorch loop::

    evaluator = Evaluator(train_images, data_range=(0.0, 1.0))
    for step in range(num_steps):
        ...  # one optimizer step
        if step % 500 == 0:
            record = evaluator.evaluate(model.sample(1000), step)
            print(record.f_mem, record.f_mem_ci_low, record.f_mem_ci_high)

One call checks the samples against ``data_range``, searches the nearest and second-nearest training image
of each (the :class:`~lightning_memwatch.NearestNeighbourIndex`, built once here), computes f_mem with its
bootstrap interval and the ratio quantiles, the FID against the reference statistics (when FID is on) and the
user metrics, all on the same samples. Drawing the samples (seeds, eval mode, ranks) is the caller's job.

The index may also be built by the caller, e.g. a
:class:`~lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex` whose training rows are split
over a process group: its search is a collective, so every rank then calls :meth:`Evaluator.evaluate` with the
same samples (MemWatch gives FID and the user metrics to the evaluator of rank 0 only).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_memwatch import _checks
from lightning_memwatch.metrics.fid import FID, FIDEvaluator
from lightning_memwatch.metrics.knn import Backend, NearestNeighbourIndex
from lightning_memwatch.metrics.memorization import KnnIndex, MemorizationResult, memorization_fraction
from lightning_memwatch.metrics.per_class import per_class_memorization
from lightning_memwatch.record import RATIO_QUANTILES, RECORD_FIELDS, EvalRecord
from lightning_memwatch.value_check import ValueProfile, check_values

__all__ = ["RATIO_QUANTILES", "Evaluator"]  # RATIO_QUANTILES: the record's, re-exported

KnnBackend = Backend  # the index's backends (metrics/knn.py), under the name this module has always used


class Evaluator:
    """Measure one batch of generated samples against the training images: f_mem, ratio quantiles, FID, metrics.

    Example:
        >>> import torch
        >>> train = torch.rand(64, 1, 8, 8)
        >>> evaluator = Evaluator(train, data_range=(0.0, 1.0), bootstrap=100)
        >>> record = evaluator.evaluate(torch.cat([train[:4], torch.rand(12, 1, 8, 8)]), step=100)
        >>> record.step, record.num_samples, record.f_mem
        (100, 16, 0.25)

    Args:
        train: the training images ``(n, ...)`` (float, in ``data_range``), or a built index of them: a
            :class:`~lightning_memwatch.NearestNeighbourIndex` or any
            :class:`~lightning_memwatch.metrics.memorization.KnnIndex` (e.g. a sharded index, whose methods are
            collectives: every rank then calls :meth:`evaluate`, :meth:`train_images` and
            :meth:`first_train_images` alike). Never modified.
        data_range: (low, high) of the training images and the samples.
        threshold: a sample is memorized when d1/d2 < threshold (the paper: 1/3).
        bootstrap: bootstrap resamples for the f_mem confidence interval.
        seed: seed of the bootstrap.
        num_samples: samples f_mem is measured on: the first ``num_samples`` of each call (images); None: all.
        fid: :class:`~lightning_memwatch.FID` settings (built here, the training images as the fallback
            reference), a built :class:`~lightning_memwatch.metrics.fid.FIDEvaluator`, or None for no FID.
            FID uses the first ``fid.num_samples`` samples (default ``num_samples``).
        metrics: extra ``{name: fn(generated) -> float}`` on all the samples of each call; stored in
            ``record.metrics``. Names must differ from the record's fields.
        feature_fn: optional map images -> features for feature-space nearest neighbours (latent models).
        knn_backend: backend of the index built here (see :class:`~lightning_memwatch.NearestNeighbourIndex`).
        device: where the index is built; default the training images' device.
        inputs_checked: the caller checks the training images against ``data_range`` and the samples at every
            call itself (MemWatch does, on every rank, so that a bad range fails on all ranks at once); skips
            those checks here.

    Attributes:
        index: the nearest-neighbour index of the training images (built once).
        fid_evaluator: the FID evaluator, or None.
        last_result: the :class:`~lightning_memwatch.MemorizationResult` of the last :meth:`evaluate` call
            (per-sample ratios and nearest training rows), or None.
    """

    def __init__(
        self,
        train: Tensor | KnnIndex,
        *,
        data_range: tuple[float, float],
        threshold: float = 1 / 3,
        bootstrap: int = 1000,
        seed: int = 0,
        num_samples: int | None = None,
        fid: FID | FIDEvaluator | None = None,
        metrics: Mapping[str, Callable[[Tensor], float]] | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        knn_backend: KnnBackend = "auto",
        device: torch.device | str | None = None,
        inputs_checked: bool = False,
    ) -> None:
        self.data_range = _checks.check_data_range(data_range)
        self.threshold = _checks.check_float(
            threshold, "threshold", low=0, low_open=True, high=1, hint="the paper uses 1/3"
        )
        self.bootstrap = _checks.check_int(bootstrap, "bootstrap", minimum=1, unit="number of resamples, e.g. 1000")
        self.seed = _checks.check_int(seed, "seed")
        self.num_samples = (
            None if num_samples is None else _checks.check_int(num_samples, "num_samples", minimum=2, unit="images")
        )
        self.metrics = check_metric_names(metrics)
        self.inputs_checked = bool(inputs_checked)
        self._overshoot_warned = False
        train_images: Tensor | None = None
        self._values: ValueProfile | None = None  # the training images' values, for the samples' check
        self.index: KnnIndex
        if not isinstance(train, Tensor) and isinstance(train, KnnIndex):
            self.index = train
        else:
            train_images = _checks.check_batch(train, "train", min_rows=2)
            if not self.inputs_checked:
                _checks.check_range(train_images, "train", self.data_range)
                small_use = _checks.check_range_use(train_images, "train", self.data_range)
                if small_use is not None:
                    warnings.warn(f"Evaluator: {small_use}", UserWarning, stacklevel=2)
                self._values = ValueProfile.of(train_images)
            where = train_images.device if device is None else torch.device(device)
            self.index = NearestNeighbourIndex(train_images.to(where), backend=knn_backend, feature_fn=feature_fn)
        # one copy of the training images: the index's rows when it holds them unchanged, else our own
        holds_originals = _holds_images(self.index) and getattr(self.index, "num_duplicates", 0) == 0
        self._train_images = None if holds_originals or train_images is None else train_images.detach()
        if isinstance(fid, FID):
            if train_images is None and fid.reference is None:
                raise ValueError(
                    "Evaluator(fid=FID(...)) with a prebuilt index needs FID(reference=...) (the training images "
                    "are the fallback reference only when passed as a tensor)."
                )
            fid = fid.build(
                data_range=self.data_range,
                device=getattr(self.index, "device", "cpu"),
                fallback_reference=train_images,
                num_samples=self.num_samples,
            )
        elif fid is not None and not isinstance(fid, FIDEvaluator):
            raise TypeError(f"fid must be FID settings, a FIDEvaluator or None; got {type(fid).__name__}.")
        self.fid_evaluator: FIDEvaluator | None = fid
        self.last_result: MemorizationResult | None = None

    # -- training images -----------------------------------------------------------------------------------
    @property
    def num_train(self) -> int:
        """Training images indexed (rows)."""
        return self.index.num_train

    @property
    def can_show_train_images(self) -> bool:
        """Whether :meth:`train_images` can return training images (it cannot for a prebuilt index of
        features whose images were not kept)."""
        return self._train_images is not None or _holds_images(self.index)

    def train_images(self, indices: Tensor) -> Tensor:
        """The training images at row ``indices`` (e.g. ``last_result.nn_indices[:, 0]``), on the CPU.
        A collective when the index is sharded."""
        if self._train_images is not None:
            return self._train_images[indices.cpu()].cpu()
        return self.index.train_images(indices).cpu()

    def first_train_images(self, count: int) -> Tensor:
        """The first ``count`` training images (fewer when the set is smaller), e.g. for the FID train floor.
        A collective when the index is sharded (where, with duplicates removed, a dropped row reads as the
        next kept one)."""
        if self._train_images is not None:
            return self._train_images[:count]
        return self.index.train_images(torch.arange(min(count, self.index.num_train)))

    # -- one evaluation ------------------------------------------------------------------------------------
    def check_samples(self, generated: Tensor, step: int) -> str | None:
        """Check samples against ``data_range``: raise when they lie mostly outside it or on another span,
        or (training images given as a tensor) on another part of the training images' range than every
        training image (:mod:`lightning_memwatch.value_check`); return a message for a small overshoot
        (clamped for FID), else None."""
        overshoot = _checks.check_sample_range(generated, f"samples at step {step}", self.data_range)
        if self._values is not None:
            check_values(generated, self._values, f"samples at step {step}")
        return overshoot

    def evaluate(
        self,
        generated: Tensor,
        step: int,
        *,
        sample_seconds: float | None = None,
        labels: Tensor | None = None,
    ) -> EvalRecord:
        """Every metric on one batch of generated samples.

        Args:
            generated: ``(m, ...)`` samples shaped like the training images, in ``data_range``.
            step: the training step they were drawn at (optimizer steps); stored in the record.
            sample_seconds: how long drawing them took (seconds), stored in the record when given.
            labels: class-conditional models: the class each sample was generated for, ``(m,)`` integers;
                the record then holds f_mem per class (``record.per_class``), memorization still judged
                against the whole training set.

        Returns:
            The :class:`~lightning_memwatch.EvalRecord` of the evaluation.
        """
        step = _checks.check_int(step, "step", minimum=0, unit="optimizer steps")
        if not self.inputs_checked:
            overshoot = self.check_samples(generated, step)
            if overshoot is not None and not self._overshoot_warned:
                self._overshoot_warned = True
                warnings.warn(f"Evaluator: {overshoot}", UserWarning, stacklevel=2)
        start = time.perf_counter()
        count = len(generated) if self.num_samples is None else self.num_samples
        result = memorization_fraction(
            generated[:count], self.index, threshold=self.threshold, bootstrap=self.bootstrap, seed=self.seed
        )
        self.last_result = result
        per_class = {}
        if labels is not None:
            per_class = per_class_memorization(result.memorized, labels[:count])
        ratios = result.ratios.float()
        quantiles = torch.quantile(
            ratios.cpu().double(), torch.tensor(list(RATIO_QUANTILES.values()), dtype=torch.float64)
        )
        fid = fid_num_samples = None
        if self.fid_evaluator is not None:
            fid_n = self.fid_evaluator.num_samples or count
            fid = float(self.fid_evaluator.compute(generated[:fid_n]))
            fid_num_samples = int(min(fid_n, len(generated)))
        metrics = {name: float(fn(generated)) for name, fn in self.metrics.items()}
        return EvalRecord(
            step=step,
            num_samples=result.num_samples,
            f_mem=float(result.fraction),
            f_mem_ci_low=float(result.ci_low),
            f_mem_ci_high=float(result.ci_high),
            **{name: float(q) for name, q in zip(RATIO_QUANTILES, quantiles, strict=True)},
            fid=fid,
            fid_num_samples=fid_num_samples,
            metrics=metrics,
            per_class=per_class,
            metric_seconds=time.perf_counter() - start,
            sample_seconds=None if sample_seconds is None else float(sample_seconds),
        )

    def __repr__(self) -> str:
        fid = "off" if self.fid_evaluator is None else self.fid_evaluator.extractor.name
        return (
            f"Evaluator(num_train={self.num_train}, backend={getattr(self.index, 'backend', None)!r}, "
            f"threshold={self.threshold:g}, "
            f"fid={fid}, metrics={list(self.metrics)})"
        )


def _holds_images(index: KnnIndex) -> bool:
    """Whether ``index.train_images`` returns images (not ``feature_fn`` features)."""
    holds = getattr(index, "holds_images", None)
    return bool(holds) if holds is not None else getattr(index, "feature_fn", None) is None


def check_metric_names(metrics: Mapping[str, Callable[[Tensor], float]] | None) -> dict[str, Callable[..., Any]]:
    """The user metrics as a dict, after checking each name is a usable record key and each value callable."""
    out = dict(metrics or {})
    for name, fn in out.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings (logged as memwatch/<name>); got {name!r}.")
        if name in RECORD_FIELDS or name in ("metrics", "extra"):
            raise ValueError(
                f"metric name {name!r} is a field of every record ({', '.join(RECORD_FIELDS)}): rename the metric."
            )
        if not callable(fn):
            raise TypeError(f"metrics[{name!r}] must be a function of the generated samples; got {type(fn).__name__}.")
    return out

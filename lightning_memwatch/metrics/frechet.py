"""Fréchet distance maths, in float64: feature statistics, their batch-by-batch accumulation, the distance.

* :func:`feature_statistics` -- mean and unbiased covariance of an (N, d) feature matrix;
* :class:`RunningMoments` -- the same, accumulated batch by batch (Chan et al.'s pairwise update, so the
  result does not depend on the batch size beyond float64 rounding);
* :func:`matrix_sqrt_psd` and :func:`frechet_distance` -- ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``,
  with ``Tr (S1 S2)^(1/2) = Tr (S2^(1/2) S1 S2^(1/2))^(1/2)`` computed from symmetric eigendecompositions:
  real arithmetic, tiny negative eigenvalues clamped to 0, and ``S2^(1/2)`` of the fixed reference reusable
  across evaluations (d = 2048 on 2 CPU threads: 1.2 s per evaluation, vs 3.6 s for
  ``torch.linalg.eigvals(S1 @ S2)`` and 12.4 s for ``scipy.linalg.sqrtm``).

The functional layer of FID (like torchmetrics' ``functional`` split): pure torch, no Lightning, no I/O, no
feature extractor. :mod:`lightning_memwatch.metrics.fid` builds the settings and the evaluator on it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_memwatch import _checks
from lightning_memwatch._checks import check_finite

__all__ = ["RunningMoments", "feature_statistics", "frechet_distance", "matrix_sqrt_psd"]


def _as_float64(x: Tensor, name: str) -> Tensor:
    """``x`` detached, as float64 on its device (on CPU for devices without float64, e.g. MPS)."""
    if not isinstance(x, Tensor):
        raise _checks.config_type_error(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    x = x.detach()
    if x.device.type not in ("cpu", "cuda"):  # e.g. MPS has no float64
        x = x.cpu()
    return x.to(torch.float64)


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of an (N, d) feature matrix, in float64.

    Raises:
        ValueError: fewer than 2 rows, not 2-D, or NaN/Inf.
    """
    features = _as_float64(features, "features")
    if features.ndim != 2 or len(features) < 2:
        raise _checks.config_error(f"features must have shape (N, d) with N >= 2; got {tuple(features.shape)}.")
    check_finite(features, "features")
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.mT @ centred / (len(features) - 1)


class RunningMoments:
    """Mean and unbiased covariance accumulated over batches of (B, d) features, in float64.

    Uses the pairwise merge of Chan, Golub & LeVeque (1979), which avoids the cancellation of
    ``sum(x x^T) - n mu mu^T`` and gives the same statistics as :func:`feature_statistics` on the
    concatenation.

    Example:
        >>> x = torch.randn(10, 3)
        >>> rm = RunningMoments(); rm.update(x[:4]); rm.update(x[4:])
        >>> torch.allclose(rm.statistics()[1], feature_statistics(x)[1])
        True
    """

    def __init__(self) -> None:
        self.num_samples = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None

    def update(self, features: Tensor) -> None:
        """Add a (B, d) batch (any float dtype; accumulated in float64 on its device, CPU for MPS)."""
        x = _as_float64(features, "features")
        if x.ndim != 2:
            raise _checks.config_error(f"features must have shape (B, d); got {tuple(x.shape)}.")
        check_finite(x, "features")
        b = len(x)
        if b == 0:
            return
        mean_b = x.mean(dim=0)
        centred = x - mean_b
        m2_b = centred.mT @ centred
        if self._mean is None or self._m2 is None:
            self.num_samples, self._mean, self._m2 = b, mean_b, m2_b
            return
        if mean_b.shape != self._mean.shape:
            raise _checks.config_error(
                f"feature dimension changed from {len(self._mean)} to {len(mean_b)} between batches."
            )
        n = self.num_samples
        total = n + b
        delta = mean_b.to(self._mean.device) - self._mean
        self._mean = self._mean + delta * (b / total)
        self._m2 = self._m2 + m2_b.to(self._m2.device) + torch.outer(delta, delta) * (n * b / total)
        self.num_samples = total

    def statistics(self) -> tuple[Tensor, Tensor]:
        """(mean (d,), covariance (d, d)), float64 on CPU.

        Raises:
            ValueError: fewer than 2 samples were added.
        """
        if self._mean is None or self._m2 is None or self.num_samples < 2:
            raise _checks.config_error(f"need at least 2 samples for a covariance; got {self.num_samples}.")
        return self._mean.cpu(), (self._m2 / (self.num_samples - 1)).cpu()


def matrix_sqrt_psd(cov: Tensor) -> Tensor:
    """Symmetric square root of a covariance matrix via ``eigh``, in float64; negative eigenvalues (rounding
    noise of a positive semi-definite matrix) are clamped to 0."""
    c = _as_float64(cov, "cov")
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise _checks.config_error(f"cov must be a square (d, d) matrix; got {tuple(c.shape)}.")
    check_finite(c, "cov")
    eigenvalues, eigenvectors = torch.linalg.eigh((c + c.mT) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.mT


def frechet_distance(
    mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor, *, sqrt_cov2: Tensor | None = None
) -> Tensor:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (the FID when these are Inception statistics).

    ``|mu1 - mu2|^2 + Tr(cov1) + Tr(cov2) - 2 Tr (cov2^(1/2) cov1 cov2^(1/2))^(1/2)``, all in float64, from
    symmetric eigendecompositions (clamping tiny negative eigenvalues); the result is clamped at 0.

    Args:
        mu1: mean (d,) of one set (e.g. generated).
        cov1: covariance (d, d) of that set.
        mu2: mean (d,) of the other set (e.g. reference).
        cov2: covariance (d, d) of the other set.
        sqrt_cov2: ``matrix_sqrt_psd(cov2)`` if already known (saves one eigendecomposition per call).

    Returns:
        0-dim float64 tensor.

    Example:
        >>> mu, cov = torch.zeros(3), torch.eye(3)
        >>> float(frechet_distance(mu, cov, mu + 1, cov))
        3.0
    """
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    cov1, cov2 = _as_float64(cov1, "cov1"), _as_float64(cov2, "cov2")
    d = mu1.shape[-1] if mu1.ndim == 1 else -1
    if mu1.ndim != 1 or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise _checks.config_error(
            f"expected mu1, mu2 of shape (d,) and cov1, cov2 of shape (d, d); got {tuple(mu1.shape)}, "
            f"{tuple(mu2.shape)}, {tuple(cov1.shape)}, {tuple(cov2.shape)}."
        )
    for t, name in ((mu1, "mu1"), (mu2, "mu2"), (cov1, "cov1"), (cov2, "cov2")):
        check_finite(t.reshape(1, -1), name)
    mu2, cov2 = mu2.to(mu1.device), cov2.to(mu1.device)
    root = matrix_sqrt_psd(cov2) if sqrt_cov2 is None else _as_float64(sqrt_cov2, "sqrt_cov2").to(mu1.device)
    middle = root @ cov1 @ root
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.mT) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt
    return distance.clamp(min=0)

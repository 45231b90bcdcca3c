"""f_mem per generated class: the global memorization decisions, counted within each class.

Memorization stays judged against the whole training set (the paper's criterion: a sample is memorized when
d1/d2 < threshold for its nearest and second-nearest training images, whatever their class); this module only
splits those per-sample decisions by the class each sample was generated for, and gives each class its sample
count, f_mem and a confidence interval.

The interval is the limit of the global interval's percentile bootstrap (see
:mod:`lightning_memwatch.metrics.memorization`): that bootstrap draws the resampled count from
``Binomial(m, c/m)``, so with ever more resamples its percentiles tend to the exact quantiles of that law, which
are computed here for all classes at once, without resampling (no seed, no Monte-Carlo noise, and about 1% of
the time ten classes x 1000 binomial draws take). Where the bootstrap collapses (0 or all of a class's samples
memorized) the exact Clopper-Pearson end is used, as for the global interval.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_memwatch._checks import config_error
from lightning_memwatch.record import ClassRecord

__all__ = ["per_class_memorization"]


def per_class_memorization(memorized: Tensor, labels: Tensor, *, confidence: float = 0.95) -> dict[int, ClassRecord]:
    """Per class of ``labels``: the samples generated for it, the fraction memorized, its interval.

    Args:
        memorized: ``(m,)`` bool, whether each sample is memorized (``MemorizationResult.memorized``).
        labels: ``(m,)`` integer class (>= 0) each sample was generated for.
        confidence: two-sided level of the intervals.

    Returns:
        ``{class: ClassRecord}``, classes in increasing order.

    Example:
        >>> import torch
        >>> out = per_class_memorization(torch.tensor([True, False, False, False]), torch.tensor([3, 3, 1, 1]))
        >>> out[3].num_samples, out[3].f_mem, out[1].f_mem
        (2, 0.5, 0.0)
    """
    if memorized.shape != labels.shape or memorized.ndim != 1:
        raise config_error(
            f"per_class_memorization: memorized {tuple(memorized.shape)} and labels {tuple(labels.shape)} must be "
            "two (m,) tensors, one entry per generated sample."
        )
    if not 0 < confidence < 1:
        raise config_error(f"confidence must lie in (0, 1), e.g. 0.95; got {confidence!r}.")
    classes = labels.detach().cpu().long()
    if len(classes) == 0:
        return {}
    if int(classes.min()) < 0:
        raise config_error(f"per_class_memorization: classes must be >= 0; got {int(classes.min())}.")
    sizes = torch.bincount(classes)
    copied = torch.bincount(classes[memorized.detach().cpu().bool()], minlength=len(sizes))
    present = sizes.nonzero().flatten()
    m, c = sizes[present].double(), copied[present].double()
    low, high = binomial_intervals(m, c, alpha=1.0 - confidence)
    return {
        k: ClassRecord(num_samples=int(mk), f_mem=ck / mk, f_mem_ci_low=lo, f_mem_ci_high=hi)
        for k, mk, ck, lo, hi in zip(present.tolist(), m.tolist(), c.tolist(), low.tolist(), high.tolist(), strict=True)
    }


def binomial_intervals(m: Tensor, c: Tensor, *, alpha: float) -> tuple[Tensor, Tensor]:
    """``(low, high)`` of each ``c / m``: the ``alpha / 2`` and ``1 - alpha / 2`` quantiles of ``Binomial(m, c/m) /
    m`` (the percentile bootstrap's limit), and the exact Clopper-Pearson end where it collapses.

    Args:
        m: ``(K,)`` sample counts (> 0), float64.
        c: ``(K,)`` memorized counts, ``0 <= c <= m``, float64.
        alpha: one minus the confidence level.

    Example:
        >>> low, high = binomial_intervals(torch.tensor([100.0]), torch.tensor([25.0]), alpha=0.05)
        >>> low.tolist(), high.tolist()
        ([0.17], [0.34])
    """
    k = torch.arange(int(m.max()) + 1, dtype=torch.float64)[None, :]  # (1, M + 1) counts
    n, p = m[:, None], (c / m).clamp(1e-12, 1 - 1e-12)[:, None]
    log_pmf = (
        torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma((n - k).clamp(min=0) + 1)
        + k * p.log() + (n - k) * torch.log1p(-p)
    )  # fmt: skip
    cdf = torch.cumsum(torch.where(k <= n, log_pmf.exp(), 0.0), dim=1)
    low = (cdf < alpha / 2).sum(1).double() / m  # the smallest count whose CDF reaches alpha / 2
    high = (cdf < 1 - alpha / 2).sum(1).double().clamp(max=m) / m
    edge = (alpha / 2) ** (1.0 / m)
    low = torch.where(c == 0, 0.0, torch.where(c == m, edge, low))
    high = torch.where(c == 0, 1.0 - edge, torch.where(c == m, 1.0, high))
    return low, high

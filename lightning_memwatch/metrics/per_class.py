"""f_mem per generated class: the global memorization decisions, counted within each class.

Memorization stays judged against the whole training set (the paper's criterion: a sample is memorized when
d1/d2 < threshold for its nearest and second-nearest training images, whatever their class); this module only
splits those per-sample decisions by the class each sample was generated for, and gives each class its sample
count, f_mem and the same confidence interval as the global one (percentile bootstrap, exact Clopper-Pearson
end at 0 or all memorized; see :mod:`lightning_memwatch.metrics.memorization`).
"""

from __future__ import annotations

from torch import Tensor

from lightning_memwatch._checks import config_error
from lightning_memwatch.metrics.memorization import _fraction_interval
from lightning_memwatch.record import ClassRecord

__all__ = ["per_class_memorization"]


def per_class_memorization(
    memorized: Tensor, labels: Tensor, *, bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95
) -> dict[int, ClassRecord]:
    """Per class of ``labels``: the samples generated for it, the fraction memorized, its interval.

    Args:
        memorized: ``(m,)`` bool, whether each sample is memorized (``MemorizationResult.memorized``).
        labels: ``(m,)`` integer class each sample was generated for.
        bootstrap: bootstrap resamples of each class's interval.
        seed: seed of the bootstrap (each class uses ``seed + class``, so a class's interval does not depend
            on which other classes were drawn).
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
    flags = memorized.detach().cpu().bool()
    classes = labels.detach().cpu().long()
    out: dict[int, ClassRecord] = {}
    for k in sorted(set(classes.tolist())):
        mine = flags[classes == k]
        m, count = len(mine), int(mine.sum())
        low, high = _fraction_interval(count, m, bootstrap=bootstrap, seed=seed + k, confidence=confidence)
        out[k] = ClassRecord(num_samples=m, f_mem=count / m, f_mem_ci_low=low, f_mem_ci_high=high)
    return out

"""Fits of tau_mem against the training-set size n: the paper's law tau_mem = slope * n and two checks of it.

One call, :func:`fit_tau_mem`, returns three least-squares fits of the runs that memorized, each with its R^2:

* ``origin``: tau_mem = slope * n through the origin (the paper's law; forecasts use it),
* ``affine``: tau_mem = intercept + slope * n (an intercept far from 0 against the tau_mem values means an
  offset the law does not have),
* ``loglog``: log tau_mem = log prefactor + exponent * log n (exponent 1 for the linear law).

R^2 is ``1 - SS_res / SS_tot`` with ``SS_tot`` around the mean of the fitted values (tau_mem, or log tau_mem for
the log-log fit), so the three are comparable; the origin fit's is negative when it does worse than the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_memwatch._arguments import config_error

__all__ = ["LineFit", "TauMemFit", "TooFewRunsError", "fit_tau_mem"]


class TooFewRunsError(ValueError):
    """Fewer than two distinct training-set sizes reached tau_mem: no line can be fitted."""


@dataclass(frozen=True)
class LineFit:
    """One straight-line fit y = intercept + slope * x and its coefficient of determination.

    Attributes:
        slope: dy/dx.
        intercept: y at x = 0 (exactly 0.0 for the fit through the origin).
        r2: ``1 - SS_res / SS_tot`` (1 for a perfect fit).
    """

    slope: float
    intercept: float
    r2: float


@dataclass(frozen=True)
class TauMemFit:
    """The three fits of tau_mem (optimizer steps) against n (training images) from one set of runs.

    Attributes:
        origin: tau_mem = slope * n (steps per training image); ``intercept`` is 0.0.
        affine: tau_mem = intercept + slope * n (intercept in steps).
        loglog: log tau_mem = intercept + slope * log n, natural logs; see :attr:`exponent`, :attr:`prefactor`.
        num_runs: runs used (those with a tau_mem).
        num_skipped: runs left out because their tau_mem is None (they never memorized).
    """

    origin: LineFit
    affine: LineFit
    loglog: LineFit
    num_runs: int
    num_skipped: int

    @property
    def exponent(self) -> float:
        """k of tau_mem ~ n ** k (1 for the linear law)."""
        return self.loglog.slope

    @property
    def prefactor(self) -> float:
        """tau_mem at n = 1 on the log-log fit (tau_mem ~ prefactor * n ** exponent), in steps."""
        return math.exp(self.loglog.intercept)

    def predict(self, n: float) -> float:
        """Forecast tau_mem (optimizer steps) for a training set of ``n`` images by the paper's law: slope * n."""
        value = _positive(n)
        if value is None:
            raise config_error(f"n must be a positive number of training images; got {n!r}.")
        return self.origin.slope * value


def fit_tau_mem(n: Sequence[float], tau_mem: Sequence[float | None]) -> TauMemFit:
    """Fit tau_mem against n from runs at several training-set sizes (origin, affine and log-log fits).

    Args:
        n: training-set sizes (images), one per run, all > 0.
        tau_mem: tau_mem of each run (optimizer steps, > 0), or None for a run that never memorized; such runs
            are left out and counted in :attr:`TauMemFit.num_skipped` (they only bound tau_mem from below).

    Returns:
        The three fits.

    Raises:
        TooFewRunsError: fewer than two distinct n among the runs with a tau_mem (a :class:`ValueError`).
        ValueError: lengths differ, or an n or tau_mem is not a positive finite number.

    Example:
        >>> fit = fit_tau_mem([1000, 2000, 4000], [30_000, 60_000, None])
        >>> fit.origin.slope, fit.origin.r2, round(fit.exponent, 6), fit.num_runs, fit.num_skipped
        (30.0, 1.0, 1.0, 2, 1)
    """
    n_list, tau_list = list(n), list(tau_mem)
    if len(n_list) != len(tau_list):
        raise config_error(f"n and tau_mem must have one entry per run; got {len(n_list)} and {len(tau_list)}.")
    xs: list[float] = []
    ys: list[float] = []
    skipped = 0
    for i, (ni, ti) in enumerate(zip(n_list, tau_list, strict=True)):
        nv = _positive(ni)
        if nv is None:
            raise config_error(f"n[{i}] must be a positive number of training images; got {ni!r}.")
        if ti is None:
            skipped += 1
            continue
        tv = _positive(ti)
        if tv is None:
            raise config_error(
                f"tau_mem[{i}] must be a positive number of steps, or None for a run that never memorized; "
                f"got {ti!r}."
            )
        xs.append(nv)
        ys.append(tv)
    if len(set(xs)) < 2:
        raise TooFewRunsError(
            f"fitting tau_mem against n needs runs at two or more distinct n that memorized; got {len(xs)} "
            f"run(s) at n = {sorted(set(xs))}. Train at another training-set size (or longer, so tau_mem fires)."
        )
    slope = sum(x * y for x, y in zip(xs, ys, strict=True)) / sum(x * x for x in xs)
    origin = LineFit(slope=slope, intercept=0.0, r2=_r2(ys, [y - slope * x for x, y in zip(xs, ys, strict=True)]))
    log_x, log_y = [math.log(x) for x in xs], [math.log(y) for y in ys]
    return TauMemFit(
        origin=origin,
        affine=_least_squares(xs, ys),
        loglog=_least_squares(log_x, log_y),
        num_runs=len(xs),
        num_skipped=skipped,
    )


def _least_squares(x: Sequence[float], y: Sequence[float]) -> LineFit:
    """Ordinary least squares y = a + b x (x takes two or more distinct values)."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y, strict=True)) / sxx
    a = my - b * mx
    return LineFit(slope=b, intercept=a, r2=_r2(y, [yi - a - b * xi for xi, yi in zip(x, y, strict=True)]))


def _r2(y: Sequence[float], residuals: Sequence[float]) -> float:
    """``1 - SS_res / SS_tot``; when every y is equal (SS_tot = 0): 1.0 for an exact fit, else 0.0."""
    mean = sum(y) / len(y)
    ss_tot = sum((yi - mean) ** 2 for yi in y)
    ss_res = sum(r**2 for r in residuals)
    if ss_tot > 0:
        return 1.0 - ss_res / ss_tot
    return 1.0 if ss_res == 0 else 0.0


def _positive(value: object) -> float | None:
    """``value`` as a positive finite float, else None (strings and bools are not numbers here)."""
    if isinstance(value, (str, bytes, bool)):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None

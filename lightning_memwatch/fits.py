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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_memwatch._arguments import config_error
from lightning_memwatch.record import finite_float

__all__ = [
    "LineFit",
    "TauMemFit",
    "TauMemForecast",
    "TooFewRunsError",
    "fit_summary",
    "fit_tau_mem",
    "forecast_tau_mem",
]


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


# -- the forecast of tau_mem for a new n (the flat view of the fits, as lightning_memwatch.detection has always
# returned it; detection re-exports these names) ----------------------------------------------------------------
@dataclass(frozen=True)
class TauMemForecast:
    """Fit of tau_mem against the training-set size n: the paper's linear law tau_mem = slope * n.

    The flat view of :class:`lightning_memwatch.fits.TauMemFit` (which :func:`lightning_memwatch.fits.fit_tau_mem`
    returns, with every fit's R^2) that :func:`forecast_tau_mem` has always returned.

    Attributes:
        slope: least-squares slope of tau_mem = slope * n through the origin (optimizer steps per training
            image); :meth:`predict` uses it.
        r2: coefficient of determination of that fit, ``1 - SS_res / SS_tot`` with ``SS_tot`` taken around
            the mean tau_mem (comparable with an ordinary fit; negative when the origin fit is worse than the
            mean).
        intercept: intercept of the unconstrained fit tau_mem = intercept + intercept_slope * n (steps); near
            zero compared with the tau_mem values when the linear law holds.
        intercept_slope: slope of that unconstrained fit.
        exponent: slope of log(tau_mem) against log(n) (1 for the linear law).
        prefactor: tau_mem at n = 1 on the log-log fit (tau_mem ~ prefactor * n ** exponent).
        num_points: runs used in the fit.
    """

    slope: float
    r2: float
    intercept: float
    intercept_slope: float
    exponent: float
    prefactor: float
    num_points: int

    @classmethod
    def from_fit(cls, fit: TauMemFit) -> TauMemForecast:
        """The flat view of ``fit``."""
        return cls(
            slope=fit.origin.slope,
            r2=fit.origin.r2,
            intercept=fit.affine.intercept,
            intercept_slope=fit.affine.slope,
            exponent=fit.exponent,
            prefactor=fit.prefactor,
            num_points=fit.num_runs,
        )

    def predict(self, n: float) -> float:
        """Forecast tau_mem (optimizer steps) for a training set of ``n`` images: ``slope * n``."""
        value = finite_float(n)
        if value is None or value <= 0:
            raise config_error(f"n must be a positive number of training images; got {n!r}.")
        return self.slope * value

    def fit_dict(self) -> dict[str, float]:
        """``{"slope", "intercept", "r2", "exponent"}`` of ONE fit, the paper's law ``tau_mem = slope * n``:
        its intercept is 0 by construction and ``r2`` is that fit's. The unconstrained fit stays available as
        :attr:`intercept` / :attr:`intercept_slope` (the sweep report prints it as ``affine``)."""
        return {"slope": self.slope, "intercept": 0.0, "r2": self.r2, "exponent": self.exponent}


def _warn_never_memorized(count: int) -> None:
    if count:
        warnings.warn(
            f"{count} run(s) with tau_mem=None (never memorized) are left out of the tau_mem fit.",
            UserWarning,
            stacklevel=3,
        )


def forecast_tau_mem(n: Sequence[float], tau_mem: Sequence[float | None]) -> TauMemForecast:
    """Fit tau_mem = slope * n from runs at several training-set sizes, to forecast tau_mem for a new n.

    The paper finds tau_mem proportional to n (f_mem curves collapse against tau / n), so the practical rule
    is: measure tau_mem at two or more small n, fit the slope, and stop training a run at size n before
    ``slope * n`` steps. The exponent of a log-log fit and the intercept of an unconstrained fit tell how well
    the linear law holds on your runs. The fits are :func:`lightning_memwatch.fits.fit_tau_mem`'s (which also
    gives the R^2 of each).

    Args:
        n: training-set sizes (images), one per run, all > 0.
        tau_mem: tau_mem of each run (optimizer steps, > 0), or None for a run that never memorized; such runs
            are left out of the fit with a warning (they only bound tau_mem from below).

    Returns:
        The fit; ``predict(n)`` gives the forecast in optimizer steps.

    Raises:
        ValueError: when lengths differ, values are not positive and finite, or fewer than two runs with
            distinct n memorized (:class:`lightning_memwatch.fits.TooFewRunsError`).

    Example:
        >>> fit = forecast_tau_mem([1000, 2000, 4000], [30_000, 60_000, 120_000])
        >>> round(fit.slope, 6), round(fit.exponent, 6), fit.predict(8000)
        (30.0, 1.0, 240000.0)
    """
    tau_list = list(tau_mem)
    try:
        fit = fit_tau_mem(n, tau_list)
    except TooFewRunsError:
        _warn_never_memorized(sum(t is None for t in tau_list))
        raise
    _warn_never_memorized(fit.num_skipped)
    return TauMemForecast.from_fit(fit)


def fit_summary(n: Sequence[float], tau_mem: Sequence[float | None]) -> dict[str, float | None]:
    """The ``{"slope", "intercept", "r2", "exponent"}`` summary of :func:`forecast_tau_mem`.

    Unlike :func:`forecast_tau_mem` it does not raise when too few runs memorized: all four values are then
    None (e.g. a demo where only one training-set size reached tau_mem), and runs with ``tau_mem=None`` are
    left out silently. Invalid inputs (lengths that differ, n <= 0) still raise.
    """
    try:
        return dict(TauMemForecast.from_fit(fit_tau_mem(n, tau_mem)).fit_dict())
    except TooFewRunsError:
        return {"slope": None, "intercept": None, "r2": None, "exponent": None}

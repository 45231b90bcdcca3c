"""A forecast of the onset of copying: the step at which f_mem will leave zero, read from the drift of the ratios.

Copies are the last symptom of a drift toward the training set: for several evaluations before f_mem leaves
zero, the whole distribution of the nearest-neighbour ratios d1/d2 slides down. f_mem leaves zero when the
lowest of the ``m`` ratios of an evaluation falls below the threshold (1/3); more generally f_mem exceeds a
level ``f0`` (the detector's tau_mem rule: 0 by default, e.g. 3% in the demo) when the ``k``-th lowest ratio
does, ``k = floor(f0 * m) + 1``. This module forecasts that step from the records alone (a pure function of
the history, no model, no samples):

1. each record's ``k``-th lowest ratio is estimated from its two lowest stored quantiles (5% and 25%) with a
   normal tail: ``sigma = (q25 - q05) / (z(0.25) - z(0.05))``, ``ratio = q05 + sigma * (z(u) - z(0.05))``,
   where ``z`` is the standard normal quantile and ``u`` the ``p`` quantile of the ``k``-th smallest of ``m``
   uniform draws (a Beta(k, m - k + 1) law; exact for ``k = 1``, normal approximation above): ``p = 1/2`` for
   the forecast, ``p = 5%`` and ``95%`` for the ends of its interval (the ``k``-th lowest of ``m`` ratios is
   itself uncertain);
2. a straight line (least squares, optimizer steps on the x axis) is fitted to the lowest ratios of the
   evaluations of the last doubling of training time (steps in ``(t / 2, t]`` for the last evaluated step
   ``t``; the last :data:`MIN_POINTS` evaluations when it holds fewer), the window the detector's plateau
   rule also reads (``window_factor = 2``): the same span of training whatever the evaluation period, and a
   span that grows with the run as the paper's timescales do (tau_mem grows in proportion to n). A forecast
   exists only while the line falls (slope below zero by more than twice its standard error) and f_mem is
   still zero;
3. the forecast is where the line meets the threshold (never before the last evaluation); its interval runs
   from where the line of the 5%-quantile lowest ratio, steeper by two standard errors and two fit errors
   lower, meets it, to where the line of the 95%-quantile lowest ratio, shallower by two standard errors and
   two fit errors higher, meets it (at least one evaluation period after the last evaluation) -- unbounded
   (None) when that line does not fall. This is a forecast
   from a straight-line drift: a drift that accelerates makes it late, one that slows makes it early.

:class:`~lightning_memwatch.MemWatch` puts the forecast in every record (``record.onset_forecast``, ``_low``,
``_high``; logged as :data:`~lightning_memwatch.record.ONSET_FORECAST`), its verbose line and TensorBoard; an
:class:`~lightning_memwatch.AdaptiveSchedule` evaluates densely around it. How far to trust it is measured in
docs/onset_forecast.md. No torch or Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

from lightning_memwatch.record import finite_float

__all__ = ["OnsetForecast", "detector_level", "forecast_onset", "lowest_ratio"]

_Z = NormalDist().inv_cdf
_Z05, _Z25 = _Z(0.05), _Z(0.25)
WINDOW_FACTOR = 2.0
"""The trend is fitted on the evaluations of the last factor of training time: steps in ``(t / 2, t]``."""
MIN_POINTS = 3
"""Fewest evaluations with ratio quantiles a forecast needs."""
SIGNIFICANCE = 2.0
"""The slope must lie this many standard errors below zero; the interval spans as many."""


@dataclasses.dataclass(frozen=True)
class OnsetForecast:
    """The forecast step at which f_mem leaves zero, with its interval.

    Attributes:
        step: forecast step (optimizer steps), or None when there is no forecast.
        low: early end of the interval (optimizer steps), or None.
        high: late end of the interval (optimizer steps), or None when unbounded (or no forecast).
        reason: one line for people: the trend read, or why there is no forecast.
    """

    step: float | None
    low: float | None
    high: float | None
    reason: str

    def describe(self) -> str:
        """``"onset forecast ~1234 [1100, 1500]"``, or the reason there is none."""
        if self.step is None:
            return f"no onset forecast ({self.reason})"
        high = "open" if self.high is None else f"{self.high:.0f}"
        return f"onset forecast ~{self.step:.0f} [{self.low:.0f}, {high}]"


def detector_level(mem_rule: str, f0: float, num_samples: int, confidence: float = 0.95) -> float:
    """The f_mem at which a :class:`~lightning_memwatch.TimescaleDetector` rule starts to hold, the level the
    forecast aims at: ``f0`` for the rule ``"threshold"`` (``f_mem > f0``); for ``"ci"`` (the interval's lower
    end above ``f0``) ``f0`` plus the count at which ``m`` samples' 95% interval leaves it, about
    ``ln(1 / 0.025) / m`` (3.7 copies: four of 1000 samples for ``f0 = 0``)."""
    if mem_rule != "ci":
        return float(f0)
    return float(f0) + math.log(2.0 / (1.0 - confidence)) / max(int(num_samples), 1)


def lowest_ratio(
    record: Mapping[str, Any], p: float = 0.5, *, level: float = 0.0, default_samples: int = 1000
) -> float | None:
    """The ``p`` quantile of the estimated ``k``-th lowest of a record's ratios d1/d2, ``k = floor(level * m)
    + 1`` (the lowest for ``level = 0``; normal tail through its 5% and 25% quantiles, see the module notes),
    or None when the record lacks them."""
    q05, q25 = finite_float(record.get("ratio_q05")), finite_float(record.get("ratio_q25"))
    if q05 is None or q25 is None:
        return None
    m = int(max(finite_float(record.get("num_samples")) or default_samples, 2.0))
    sigma = max(q25 - q05, 0.0) / (_Z25 - _Z05)
    return q05 + sigma * (_Z(_order_statistic(int(level * m) + 1, m, p)) - _Z05)


def _order_statistic(k: int, m: int, p: float) -> float:
    """The ``p`` quantile of the ``k``-th smallest of ``m`` uniform draws (Beta(k, m - k + 1))."""
    k = min(max(k, 1), m)
    if k == 1:
        return 1.0 - (1.0 - p) ** (1.0 / m)  # P(min <= u) = p
    mean = k / (m + 1)
    sd = math.sqrt(k * (m - k + 1) / ((m + 1) ** 2 * (m + 2)))
    return min(max(mean + _Z(p) * sd, 1e-9), 1 - 1e-9)


def forecast_onset(
    history: Sequence[Mapping[str, Any]],
    *,
    threshold: float = 1 / 3,
    level: float = 0.0,
    window: int | None = None,
) -> OnsetForecast:
    """Forecast, after the last record of ``history``, the step at which f_mem leaves zero (exceeds ``level``).

    Args:
        history: evaluation records in step order (:class:`~lightning_memwatch.EvalRecord` or dicts with
            ``step``, ``f_mem``, ``ratio_q05``, ``ratio_q25`` and optionally ``num_samples``).
        threshold: the memorization threshold on d1/d2 (MemWatch's ``threshold``).
        level: the f_mem the onset is counted from (a fraction): 0 (f_mem leaves zero), or the detector's
            ``f0`` (MemWatch passes it).
        window: the trend is fitted on the last ``window`` evaluations (at least :data:`MIN_POINTS`); None
            (default): on those of the last doubling of training time, steps in ``(t / 2, t]`` after the last
            evaluated step ``t`` (:data:`WINDOW_FACTOR`), at least the last :data:`MIN_POINTS`.

    Returns:
        An :class:`OnsetForecast` (``step`` None when f_mem is already above ``level``, when fewer than
        :data:`MIN_POINTS` records hold the quantiles, or when the ratios do not fall significantly).

    Example:
        >>> history = [{"step": s, "f_mem": 0.0, "ratio_q05": 0.9 - s / 2000, "ratio_q25": 1.0 - s / 2000,
        ...             "num_samples": 512} for s in (0, 100, 200, 300, 400)]
        >>> forecast = forecast_onset(history)
        >>> round(forecast.step), forecast.low <= forecast.step <= forecast.high
        (854, True)
    """
    if not history:
        return OnsetForecast(None, None, None, "no evaluation yet")
    last = history[-1]
    f_last = finite_float(last.get("f_mem"))
    if f_last is not None and f_last > level:
        return OnsetForecast(None, None, None, f"f_mem is already above {'zero' if level == 0 else f'{level:.3g}'}")
    points = [(int(r["step"]), *(lowest_ratio(r, p, level=level) for p in (0.5, 0.05, 0.95))) for r in history]
    points = [point for point in points if None not in point]
    points = _window(points, window)
    if len(points) < MIN_POINTS:
        why = f"{len(points)} evaluation(s) with ratio quantiles, {MIN_POINTS} needed"
        return OnsetForecast(None, None, None, why)
    steps = [float(point[0]) for point in points]
    fit = _line(steps, [point[1] for point in points])
    if fit is None:
        return OnsetForecast(None, None, None, "all evaluations at one step")
    slope, slope_se, at_last, fit_se = fit
    t_last = steps[-1]
    if not slope + SIGNIFICANCE * slope_se < 0:
        why = f"the lowest ratio does not fall (slope {slope * 1000:+.3g} per 1000 steps)"
        return OnsetForecast(None, None, None, why)
    step = t_last + max(at_last - threshold, 0.0) / -slope
    early = _line(steps, [point[2] for point in points])
    late = _line(steps, [point[3] for point in points])
    assert early is not None and late is not None  # the same steps as `fit`
    steep = early[0] - SIGNIFICANCE * early[1]
    low = t_last + max(early[2] - SIGNIFICANCE * early[3] - threshold, 0.0) / -min(steep, slope)
    shallow = late[0] + SIGNIFICANCE * late[1]
    high = None if shallow >= 0 else t_last + max(late[2] + SIGNIFICANCE * late[3] - threshold, 0.0) / -shallow
    if high is not None:  # f_mem was 0 at t_last: an onset is seen at the next evaluation at the earliest
        high = max(high, t_last + (steps[-1] - steps[-2]))
    which = "lowest" if level == 0 else f"{level:.3g}-quantile"
    reason = (
        f"{which} ratio ~{at_last:.3f} at step {t_last:.0f}, falling {-slope * 1000:.3g} per 1000 steps over "
        f"{len(points)} evaluations"
    )
    return OnsetForecast(step, min(low, step), None if high is None else max(high, step), reason)


def _window(points: list[tuple], window: int | None) -> list[tuple]:
    """The points (step first, in step order) the trend is fitted on: the last ``window``, or (None) those
    after ``t / WINDOW_FACTOR`` for the last step ``t``; never fewer than :data:`MIN_POINTS` (when there are)."""
    if window is not None:
        return points[-max(int(window), MIN_POINTS) :]
    if not points:
        return points
    since = points[-1][0] / WINDOW_FACTOR
    recent = [point for point in points if point[0] > since]
    return recent if len(recent) >= MIN_POINTS else points[-MIN_POINTS:]


def _line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float, float] | None:
    """Least-squares line through (x, y): ``(slope, its standard error, value at the last x, standard error of
    that value)``; None when all x coincide. With 2 points the errors are 0."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    if sxx <= 0:
        return None
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / sxx
    intercept = my - slope * mx
    residual = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    sigma2 = residual / (n - 2) if n > 2 else 0.0
    slope_se = math.sqrt(sigma2 / sxx)
    at_last = intercept + slope * x[-1]
    fit_se = math.sqrt(sigma2 * (1.0 / n + (x[-1] - mx) ** 2 / sxx))
    return slope, slope_se, at_last, fit_se

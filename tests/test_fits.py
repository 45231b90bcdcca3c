"""fit_tau_mem on known lines and laws, checked against numpy's least squares; the detection wrappers over it."""

from __future__ import annotations

import doctest
import math
import random
import warnings

import numpy as np
import pytest

from lightning_memwatch import fits
from lightning_memwatch.detection import TauMemForecast, fit_summary, forecast_tau_mem
from lightning_memwatch.fits import LineFit, TauMemFit, TooFewRunsError, fit_tau_mem

NS = [64, 128, 256, 512, 1024]


def test_the_paper_law_is_recovered_exactly():
    fit = fit_tau_mem(NS, [20 * n for n in NS])
    # integer sums: slope = sum(20 n^2) / sum(n^2) is exact in floating point, and so is every residual
    assert fit.origin == LineFit(slope=20.0, intercept=0.0, r2=1.0)
    assert fit.affine.slope == pytest.approx(20.0, rel=1e-12)
    assert fit.affine.intercept == pytest.approx(0.0, abs=1e-9 * 20 * max(NS))
    assert fit.affine.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.exponent == pytest.approx(1.0, abs=1e-12) and fit.prefactor == pytest.approx(20.0, rel=1e-12)
    assert fit.loglog.r2 == pytest.approx(1.0, abs=1e-12)
    assert (fit.num_runs, fit.num_skipped) == (5, 0)
    assert fit.predict(4096) == 20.0 * 4096


def test_an_offset_shows_in_the_affine_fit_only():
    fit = fit_tau_mem(NS, [1000 + 5 * n for n in NS])
    assert fit.affine.slope == pytest.approx(5.0, rel=1e-12)
    assert fit.affine.intercept == pytest.approx(1000.0, rel=1e-12)
    assert fit.affine.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.origin.intercept == 0.0 and fit.origin.r2 < 0.9  # through the origin the offset cannot fit
    assert fit.exponent < 0.9  # and the log-log slope falls below 1


def test_a_power_law_gives_its_exponent_and_prefactor():
    fit = fit_tau_mem(NS, [3.0 * n**0.8 for n in NS])
    assert fit.exponent == pytest.approx(0.8, rel=1e-10)
    assert fit.prefactor == pytest.approx(3.0, rel=1e-10)
    assert fit.loglog.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.affine.r2 < 1.0 and fit.origin.r2 < fit.affine.r2  # a line cannot bend


def test_noisy_runs_match_numpy_least_squares():
    rng = random.Random(0)
    ns = [100, 200, 300, 500, 800, 1300, 2100]
    taus = [40.0 * n * math.exp(0.1 * rng.gauss(0, 1)) + 300 * rng.random() for n in ns]
    fit = fit_tau_mem(ns, taus)
    x, y = np.array(ns, dtype=float), np.array(taus)

    def r2(observed: np.ndarray, predicted: np.ndarray) -> float:
        return 1.0 - float(((observed - predicted) ** 2).sum() / ((observed - observed.mean()) ** 2).sum())

    (slope,), *_ = np.linalg.lstsq(x[:, None], y, rcond=None)
    b, a = np.polyfit(x, y, 1)
    k, log_c = np.polyfit(np.log(x), np.log(y), 1)
    assert fit.origin.slope == pytest.approx(slope, rel=1e-10)
    assert fit.origin.r2 == pytest.approx(r2(y, slope * x), rel=1e-9)
    assert (fit.affine.slope, fit.affine.intercept) == pytest.approx((b, a), rel=1e-8)
    assert fit.affine.r2 == pytest.approx(r2(y, a + b * x), rel=1e-9)
    assert fit.exponent == pytest.approx(k, rel=1e-9) and fit.prefactor == pytest.approx(math.exp(log_c), rel=1e-8)
    assert fit.loglog.r2 == pytest.approx(r2(np.log(y), log_c + k * np.log(x)), rel=1e-9)
    assert 0.9 < fit.origin.r2 < 1.0


def test_runs_that_never_memorized_are_skipped_and_counted():
    fit = fit_tau_mem([100, 200, 400, 800], [2000, None, 8000, None])
    assert (fit.num_runs, fit.num_skipped) == (2, 2)
    assert fit.origin.slope == 20.0


def test_equal_tau_at_every_n():
    fit = fit_tau_mem([100, 200, 400], [5000, 5000, 5000])
    assert fit.affine == LineFit(slope=0.0, intercept=5000.0, r2=1.0)  # SS_tot = 0 and the fit is exact
    assert fit.origin.r2 == 0.0  # SS_tot = 0 and the line through the origin misses


@pytest.mark.parametrize(
    ("n", "tau", "match"),
    [
        ([], [], "two or more distinct n"),
        ([1000], [5000], "two or more distinct n"),
        ([1000, 1000], [5000, 5100], "two or more distinct n"),
        ([1000, 2000], [5000, None], r"got 1 run\(s\) at n = \[1000.0\]"),
    ],
)
def test_fewer_than_two_distinct_n_raise_too_few_runs(n, tau, match):
    with pytest.raises(TooFewRunsError, match=match):
        fit_tau_mem(n, tau)
    assert issubclass(TooFewRunsError, ValueError)


@pytest.mark.parametrize(
    ("n", "tau", "match"),
    [
        ([1000, 2000], [5000], "one entry per run"),
        ([0, 2000], [5000, 6000], r"n\[0\]"),
        ([1000, "2000"], [5000, 6000], r"n\[1\]"),
        ([1000, True], [5000, 6000], r"n\[1\]"),
        ([1000, 2000], [5000, -1], r"tau_mem\[1\]"),
        ([1000, 2000], [5000, float("nan")], r"tau_mem\[1\]"),
        ([1000, 2000], [float("inf"), 6000], r"tau_mem\[0\]"),
    ],
)
def test_bad_input_names_the_entry(n, tau, match):
    with pytest.raises(ValueError, match=match) as info:
        fit_tau_mem(n, tau)
    assert not isinstance(info.value, TooFewRunsError)


def test_predict_rejects_non_positive_n():
    fit = fit_tau_mem([1, 2], [10, 20])
    with pytest.raises(ValueError, match="positive number of training images"):
        fit.predict(-5)


def test_the_docstring_example_holds():
    assert doctest.testmod(fits, optionflags=doctest.ELLIPSIS).failed == 0


# -- the names kept in lightning_memwatch.detection ----------------------------------------------------------
def test_forecast_tau_mem_is_the_flat_view_of_fit_tau_mem():
    taus = [1000 + 19.0 * n for n in NS]
    fit, forecast = fit_tau_mem(NS, taus), forecast_tau_mem(NS, taus)
    assert forecast == TauMemForecast.from_fit(fit)
    assert (forecast.slope, forecast.r2) == (fit.origin.slope, fit.origin.r2)
    assert (forecast.intercept, forecast.intercept_slope) == (fit.affine.intercept, fit.affine.slope)
    assert (forecast.exponent, forecast.prefactor, forecast.num_points) == (fit.exponent, fit.prefactor, 5)
    assert fit_summary(NS, taus) == {"slope": fit.origin.slope, "intercept": 0.0, "r2": fit.origin.r2,
                                     "exponent": fit.exponent}


def test_forecast_still_warns_about_skipped_runs_and_fit_summary_stays_silent():
    with pytest.warns(UserWarning, match="1 run"):
        forecast_tau_mem([100, 200, 400], [2000, 4000, None])
    with pytest.warns(UserWarning, match="1 run"), pytest.raises(TooFewRunsError):
        forecast_tau_mem([100, 200], [2000, None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit_summary([100, 200], [2000, None])["slope"] is None
        assert fit_summary([100, 200, 400], [2000, 4000, None])["slope"] == 20.0


def test_the_result_types_are_frozen():
    fit = fit_tau_mem([1, 2], [10, 20])
    assert isinstance(fit, TauMemFit)
    with pytest.raises(AttributeError):
        fit.num_runs = 3  # type: ignore[misc]

"""The Fréchet maths (metrics/frechet.py): against scipy, rank-deficient cases, running moments, and the module's
independence from Lightning and from the FID evaluator."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from lightning_memwatch.metrics.frechet import (
    RunningMoments,
    feature_statistics,
    frechet_distance,
    matrix_sqrt_psd,
)

torch.set_num_threads(1)


def _scipy_fid(mu1: np.ndarray, c1: np.ndarray, mu2: np.ndarray, c2: np.ndarray) -> float:
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean).real)


# ---- functional --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_matches_scipy_sqrtm(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d = 16
    a, b = rng.normal(size=(200, d)), rng.normal(size=(150, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    mu1, c1, mu2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = _scipy_fid(mu1, c1, mu2, c2)
    args = [torch.from_numpy(v) for v in (mu1, c1, mu2, c2)]
    got = frechet_distance(*args)
    assert got.dtype == torch.float64 and got.ndim == 0
    assert float(got) == pytest.approx(expected, rel=1e-9)
    with_root = frechet_distance(*args, sqrt_cov2=matrix_sqrt_psd(args[3]))
    assert float(with_root) == pytest.approx(expected, rel=1e-9)
    swapped = frechet_distance(args[2], args[3], args[0], args[1])
    assert float(swapped) == pytest.approx(expected, rel=1e-9)
    # float32 inputs are computed in float64 too
    assert float(frechet_distance(*[t.float() for t in args])) == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_rank_deficient_is_finite_and_agrees_with_scipy() -> None:
    rng = np.random.default_rng(3)
    d = 32
    a, b = rng.normal(size=(5, d)), rng.normal(size=(7, d)) + 0.1  # ranks 4 and 6 << d
    mu1, c1, mu2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    got = float(frechet_distance(*[torch.from_numpy(v) for v in (mu1, c1, mu2, c2)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy may warn about the singular product
        expected = _scipy_fid(mu1, c1, mu2, c2)
    assert math.isfinite(got) and got >= 0
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_frechet_distance_zero_for_identical_and_simple_cases() -> None:
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    mu, cov = feature_statistics(x)
    assert float(frechet_distance(mu, cov, mu, cov)) == pytest.approx(0.0, abs=1e-10)
    eye = torch.eye(3, dtype=torch.float64)
    assert float(frechet_distance(torch.zeros(3), eye, torch.full((3,), 2.0), eye)) == pytest.approx(12.0)
    assert float(frechet_distance(torch.zeros(3), eye, torch.zeros(3), 4 * eye)) == pytest.approx(3.0)


def test_matrix_sqrt_clamps_negative_rounding() -> None:
    v = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cov = v @ v.T - 1e-12 * torch.eye(6, dtype=torch.float64)  # PSD up to tiny negative eigenvalues
    root = matrix_sqrt_psd(cov)
    assert torch.isfinite(root).all()
    assert torch.allclose(root @ root, cov, atol=1e-6)


def test_frechet_distance_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"shape \(d,\)"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.tensor([0.0, float("nan")]), torch.eye(2))


def test_running_moments_equal_feature_statistics_for_any_split() -> None:
    x = (
        torch.randn(37, 5, generator=torch.Generator().manual_seed(0)) * 3 + 100
    )  # large mean: cancellation test
    mean, cov = feature_statistics(x)
    assert torch.allclose(cov, torch.cov(x.double().T), rtol=1e-10)
    for split in ([37], [1, 36], [10, 10, 10, 7], [2] * 18 + [1]):
        moments = RunningMoments()
        for chunk in torch.split(x, split):
            moments.update(chunk)
        m, c = moments.statistics()
        assert moments.num_samples == 37
        assert torch.allclose(m, mean, rtol=1e-12) and torch.allclose(c, cov, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        RunningMoments().statistics()
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(torch.zeros(1, 3))


def test_old_import_path_gives_the_same_functions() -> None:
    from lightning_memwatch.metrics import fid, frechet

    for name in frechet.__all__:
        assert getattr(fid, name) is getattr(frechet, name)
        assert name in fid.__all__

"""Memorization ratio, f_mem with its interval, and the torchmetrics Metric (incl. a two-rank reduction)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends
from lightning_memwatch.metrics.memorization import (
    MemorizationFraction,
    MemorizationResult,
    memorization_fraction,
    memorization_ratios,
)

torch.set_num_threads(1)
BACKENDS = available_backends("cpu")


def dyadic(*shape: int, levels: int = 1024, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels, shape, generator=g).float() / levels


def brute_ratios(generated: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    q = generated.reshape(len(generated), -1).double()
    t = torch.unique(train.reshape(len(train), -1).double(), dim=0)
    d = ((q[:, None, :] - t[None]) ** 2).sum(dim=2).sqrt().sort(dim=1).values
    return d[:, 0] / d[:, 1]


@pytest.fixture(scope="module")
def train() -> torch.Tensor:
    return dyadic(200, 1, 8, 8, seed=1)  # 200 images of 1x8x8 in [-1, 1)


@pytest.fixture(scope="module")
def planted(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """100 samples: 25 exact copies and 10 near copies (memorized), 65 far away (not memorized)."""
    g = torch.Generator().manual_seed(2)
    copies = train[torch.randperm(200, generator=g)[:25]]
    near = train[50:60] + 0.01 * torch.randn(10, 1, 8, 8, generator=g)
    far = 40.0 + torch.randn(65, 1, 8, 8, generator=g)  # off the training scale: search through an index
    generated = torch.cat([copies, near, far])
    memorized = torch.zeros(100, dtype=torch.bool)
    memorized[:35] = True
    perm = torch.randperm(100, generator=g)
    return generated[perm], memorized[perm]


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_geometry(train: torch.Tensor, planted, backend: str) -> None:
    generated, truth = planted
    index = NearestNeighbourIndex(train, backend=backend)
    result = memorization_fraction(generated, index)
    assert isinstance(result, MemorizationResult)
    assert result.fraction == 0.35 and result.num_samples == 100 and result.num_memorized == 35
    assert torch.equal(result.memorized, truth)
    copies = result.distances[:, 0] == 0
    assert int(copies.sum()) == 25 and bool((result.ratios[copies] == 0).all())
    assert bool((result.ratios[~truth] > 0.9).all())  # far points: both neighbours about equally far
    assert result.nn_indices.shape == (100, 2) and result.nn_indices.dtype == torch.int64
    assert result.ci_low <= result.fraction <= result.ci_high and result.ci_low > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_midpoint_of_two_training_points_has_ratio_one(train: torch.Tensor, backend: str) -> None:
    a = train[7].clone()
    b = a.clone()
    b[0, 0, :4] += 1.0 / 64  # a close pair; every other training point is far from their midpoint
    pair_train = torch.cat([train, b[None]])
    midpoint = (a + b)[None] / 2  # exact in float32
    ratio = memorization_ratios(midpoint, NearestNeighbourIndex(pair_train, backend=backend))
    assert ratio.tolist() == [1.0]
    result = memorization_fraction(midpoint, pair_train)
    assert sorted(result.nn_indices[0].tolist()) == [7, 200] and not bool(result.memorized[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratios_match_float64_brute_force(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    train = torch.randn(300, 3, 4, 4, generator=g)
    generated = torch.cat([train[:30] + 0.05 * torch.randn(30, 3, 4, 4, generator=g), torch.randn(70, 3, 4, 4)])
    ratios = memorization_ratios(generated, NearestNeighbourIndex(train, backend=backend))
    assert ratios.dtype == torch.float32 and ratios.shape == (100,)
    assert (ratios.double() - brute_ratios(generated, train)).abs().max() < 1e-5


def test_scale_invariance_for_a_non_dyadic_factor() -> None:
    g = torch.Generator().manual_seed(4)
    train, generated = torch.randn(100, 12, generator=g), torch.randn(40, 12, generator=g)
    r0 = memorization_ratios(generated, train)
    r1 = memorization_ratios(generated * 3.7, train * 3.7)
    assert (r0 - r1).abs().max() < 1e-5


finite32 = st.floats(-100, 100, width=32, allow_subnormal=False)


@st.composite
def point_sets(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    dim = draw(st.integers(1, 6))
    n = draw(st.integers(2, 12))
    m = draw(st.integers(1, 5))
    train = draw(arrays(np.float32, (n, dim), elements=finite32))
    generated = draw(arrays(np.float32, (m, dim), elements=finite32))
    assume(len(np.unique(train, axis=0)) >= 2)
    return torch.from_numpy(train), torch.from_numpy(generated)


@pytest.mark.filterwarnings("ignore:train holds")
@settings(max_examples=60, deadline=None)
@given(sets=point_sets(), backend=st.sampled_from(BACKENDS))
def test_property_ratio_in_unit_interval_and_exact(sets, backend: str) -> None:
    train, generated = sets
    index = NearestNeighbourIndex(train, backend=backend)
    ratios = memorization_ratios(generated, index)
    assert bool(torch.isfinite(ratios).all())
    assert bool(((ratios >= 0) & (ratios <= 1)).all())
    assert (ratios.double() - brute_ratios(generated, train)).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:train holds")
@settings(max_examples=60, deadline=None)
@given(sets=point_sets(), power=st.integers(-6, 6))
def test_property_ratio_is_scale_invariant(sets, power: int) -> None:
    train, generated = sets
    scale = 2.0**power  # exact in float32, so the ratios must agree bit for bit
    r0 = memorization_ratios(generated, NearestNeighbourIndex(train, backend="torch"))
    r1 = memorization_ratios(generated * scale, NearestNeighbourIndex(train * scale, backend="torch"))
    assert torch.equal(r0, r1)


def test_zero_second_distance_gives_ratio_zero_not_nan() -> None:
    train = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])
    index = NearestNeighbourIndex(train, dedupe=False)
    result = memorization_fraction(torch.tensor([[0.0, 0.0], [5.0, 5.0]]), index)
    assert result.distances[0].tolist() == [0.0, 0.0]
    assert result.ratios.tolist()[0] == 0.0 and not bool(torch.isnan(result.ratios).any())
    assert result.memorized.tolist() == [True, True]


def test_interval_when_none_or_all_are_memorized(train: torch.Tensor) -> None:
    far = 40.0 + dyadic(50, 1, 8, 8, seed=5)
    # far from every training image on purpose: through an index (a tensor would have the samples' scale
    # checked against the training images' and raise, see test_value_check.py)
    none = memorization_fraction(far, NearestNeighbourIndex(train))
    assert none.fraction == 0.0 and none.ci_low == 0.0
    assert none.ci_high == pytest.approx(1 - 0.025 ** (1 / 50))  # exact Clopper-Pearson upper bound
    assert 0.05 < none.ci_high < 0.08
    every = memorization_fraction(train[:50], train, confidence=0.9)
    assert every.fraction == 1.0 and every.ci_high == 1.0
    assert every.ci_low == pytest.approx(0.05 ** (1 / 50))


def test_bootstrap_is_seeded_and_matches_resampling_samples(train: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(6)
    generated = torch.cat([train[:40], 40.0 + torch.randn(360, 1, 8, 8, generator=g)])  # f_mem = 0.1
    index = NearestNeighbourIndex(train)
    a = memorization_fraction(generated, index, bootstrap=2000, seed=11)
    b = memorization_fraction(generated, index, bootstrap=2000, seed=11)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert a.fraction == 0.1
    # The authors' procedure: resample the samples with replacement, count memorized, take percentiles.
    rng = np.random.default_rng(0)
    mask = a.memorized.numpy()
    means = np.array([mask[rng.integers(0, 400, 400)].mean() for _ in range(2000)])
    low, high = np.percentile(means, [2.5, 97.5])
    assert abs(a.ci_low - low) <= 0.006 and abs(a.ci_high - high) <= 0.006
    assert a.ci_low < 0.1 < a.ci_high


def test_threshold_is_strict_and_configurable() -> None:
    train = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 9.0]])
    generated = torch.tensor([[1.0, 0.0]])  # d1 = 1, d2 = 3: ratio 1/3 (rounded up in float32)
    assert memorization_fraction(generated, train).fraction == 0.0
    assert memorization_fraction(generated, train, threshold=0.5).fraction == 1.0


def test_results_follow_the_generated_device_and_inputs_are_untouched(train: torch.Tensor, planted) -> None:
    generated, _ = planted
    before_g, before_t = generated.clone(), train.clone()
    result = memorization_fraction(generated, NearestNeighbourIndex(train))
    assert result.ratios.device == generated.device
    assert torch.equal(generated, before_g) and torch.equal(train, before_t)


def test_bad_inputs_get_errors_that_name_the_fix(train: torch.Tensor) -> None:
    index = NearestNeighbourIndex(train)
    with pytest.raises(ValueError, match="generated must hold at least 1 rows"):
        memorization_fraction(torch.empty(0, 1, 8, 8), index)
    bad = train[:3].clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="generated contains 1 NaN/Inf"):
        memorization_ratios(bad, index)
    with pytest.raises(TypeError, match=r"generated has dtype torch.uint8.*generated\.float\(\)"):
        memorization_fraction(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), index)
    with pytest.raises(ValueError, match=r"shape \(3, 4, 4\) per sample but the training images \(1, 8, 8\)"):
        memorization_fraction(torch.zeros(3, 3, 4, 4), index)
    with pytest.raises(ValueError, match="at least 2"):
        memorization_fraction(train[:3], train[:1])
    with pytest.raises(TypeError, match="NearestNeighbourIndex or the training set as a tensor"):
        memorization_ratios(train[:3], train.tolist())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"threshold must be a number in \(0, 1\]"):
        memorization_fraction(train[:3], index, threshold=0.0)
    with pytest.raises(ValueError, match="bootstrap must be a positive int"):
        memorization_fraction(train[:3], index, bootstrap=0)
    with pytest.raises(ValueError, match="confidence must lie in"):
        memorization_fraction(train[:3], index, confidence=95)


# ----------------------------------------------------------------------------------------------- the Metric
@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_two_updates_equal_one_call(train: torch.Tensor, planted) -> None:
    generated, _ = planted
    index = NearestNeighbourIndex(train)  # (the planted far samples are off the training images' scale)
    metric = MemorizationFraction(index)
    metric.update(generated[:37])
    metric.update(generated[37:])
    assert int(metric.total) == 100 and int(metric.memorized) == 35
    assert float(metric.compute()) == pytest.approx(memorization_fraction(generated, index).fraction)
    clone = metric.clone()  # deep copy, index included
    clone.update(generated[:10])
    assert int(clone.total) == 110 and int(metric.total) == 100
    metric.reset()
    with pytest.raises(RuntimeError, match="call update"):
        metric.compute()


def test_metric_sums_counts_across_two_ranks(train: torch.Tensor, planted) -> None:
    """Two ranks, each with its own samples: torchmetrics' own sync code runs with a simulated all_gather."""
    generated, _ = planted
    index = NearestNeighbourIndex(train)
    rank1 = MemorizationFraction(index)
    rank1.update(generated[70:])  # 30 samples, few memorized: a mean of per-rank fractions would differ

    def other_states() -> Iterator[torch.Tensor]:
        yield rank1.memorized.clone()
        yield rank1.total.clone()

    queue = other_states()

    def fake_all_gather(tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        return [tensor, next(queue)]

    rank0 = MemorizationFraction(index, dist_sync_fn=fake_all_gather, distributed_available_fn=lambda: True)
    rank0.update(generated[:70])
    assert int(rank0.total) == 70
    assert float(rank0.compute()) == pytest.approx(0.35)
    per_rank = (float(memorization_fraction(generated[:70], index).fraction) + float(rank1.compute())) / 2
    assert not math.isclose(per_rank, 0.35)
    # merge_state uses the same dist_reduce_fx ("sum")
    merged = MemorizationFraction(index)
    merged.update(generated[:70])
    merged.merge_state(rank1)
    assert float(merged.compute()) == pytest.approx(0.35)


def test_metric_rejects_a_bad_threshold(train: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="threshold"):
        MemorizationFraction(train, threshold=2.0)


def test_channels_last_copies_raise_in_the_public_functions():
    from lightning_memwatch import MemorizationFraction, memorization_fraction, memorization_ratios

    gen = torch.Generator().manual_seed(0)
    train = torch.rand((10, 3, 4, 5), generator=gen)
    copies = train[:4].permute(0, 2, 3, 1).contiguous()  # the same images, channels-last: same flattened size
    for call in (
        lambda: memorization_ratios(copies, train),
        lambda: memorization_fraction(copies, train),
        lambda: MemorizationFraction(train).update(copies),
    ):
        expected = r"\(4, 5, 3\) per sample but the training images \(3, 4, 5\).*channels-last"
        with pytest.raises(ValueError, match=expected):
            call()
    assert float(MemorizationFraction(train).forward(train[:4])) == 1.0  # the right layout: copies found

"""Evaluator: the Lightning-free evaluation core (samples in, EvalRecord out)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lightning_memwatch import FID, EvalRecord, Evaluator, NearestNeighbourIndex, memorization_fraction

torch.set_num_threads(1)


def images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


TRAIN = images(64, 0)


def with_copies(num_copies: int, total: int, seed: int = 1) -> torch.Tensor:
    """``num_copies`` near-copies of training images, then new images: f_mem = num_copies / total."""
    noise = 1e-3 * torch.randn(num_copies, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return torch.cat([(TRAIN[:num_copies] + noise).clamp(0, 1), images(total - num_copies, seed + 1)])


class TinyFeatures(torch.nn.Module):
    """A frozen conv feature extractor: images (N, 1, 8, 8) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.requires_grad_(False)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_a_record_holds_what_the_metric_functions_give_on_the_same_samples():
    generated = with_copies(8, 40)
    evaluator = Evaluator(TRAIN, data_range=(0.0, 1.0), bootstrap=200, seed=3, metrics={"mean": lambda g: g.mean()})
    record = evaluator.evaluate(generated, step=250, sample_seconds=1.5)
    assert isinstance(record, EvalRecord) and record.step == 250 and record.sample_seconds == 1.5
    expected = memorization_fraction(generated, NearestNeighbourIndex(TRAIN), bootstrap=200, seed=3)
    assert record.f_mem == expected.fraction == pytest.approx(8 / 40)
    assert (record.f_mem_ci_low, record.f_mem_ci_high) == (expected.ci_low, expected.ci_high)
    quantiles = torch.quantile(expected.ratios.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]).double())
    got = [record.ratio_q05, record.ratio_q25, record.ratio_median, record.ratio_q75, record.ratio_q95]
    assert got == pytest.approx(quantiles.tolist(), rel=1e-5, abs=1e-6)  # float32 ratios: same kernels, any CPU
    assert record.metrics["mean"] == pytest.approx(float(generated.mean()), rel=1e-6)
    assert record.fid is None and record.fid_num_samples is None and record.metric_seconds >= 0
    assert torch.equal(evaluator.last_result.memorized, expected.memorized)
    nearest = evaluator.train_images(evaluator.last_result.nn_indices[:8, 0])
    assert torch.equal(nearest, TRAIN[:8])  # the copies' nearest training images


def test_num_samples_takes_the_first_samples_for_f_mem_and_all_for_metrics():
    seen = []
    evaluator = Evaluator(
        TRAIN, data_range=(0.0, 1.0), num_samples=10, bootstrap=50, metrics={"n": lambda g: seen.append(len(g)) or 0}
    )
    record = evaluator.evaluate(with_copies(5, 30), step=0)
    assert record.num_samples == 10 and record.f_mem == pytest.approx(0.5) and seen == [30]


def test_fid_on_the_same_samples(tmp_path):
    reference = images(48, 5)
    fid = FID(reference=reference, feature_extractor=TinyFeatures(), num_samples=24, cache_dir=tmp_path)
    evaluator = Evaluator(TRAIN, data_range=(0.0, 1.0), bootstrap=50, num_samples=16, fid=fid)
    # far: noise of half the contrast, around the middle (all below the middle would be another scale,
    # which the value check refuses: test_value_check.py)
    close, far = evaluator.evaluate(reference[:32], step=0), evaluator.evaluate(images(32, 9) * 0.5 + 0.25, step=1)
    assert close.fid_num_samples == far.fid_num_samples == 24 and close.num_samples == 16
    assert 0 <= close.fid < far.fid  # reference images themselves are closer to the reference
    assert evaluator.fid_evaluator.last_num_samples == 24


def test_samples_outside_data_range_fail_or_warn_once():
    evaluator = Evaluator(TRAIN, data_range=(0.0, 1.0), bootstrap=50)
    with pytest.raises(ValueError, match=r"data_range \(0, 1\)"):
        evaluator.evaluate(with_copies(2, 20) * 2 - 1, step=10)  # [-1, 1] samples for [0, 1] data
    overshoot = with_copies(2, 20)
    overshoot[-1, 0, 0, 0] = 1.08
    with pytest.warns(UserWarning, match="small overshoot"):
        evaluator.evaluate(overshoot, step=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator.evaluate(overshoot, step=30)  # once per evaluator


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="data_range"):
        Evaluator(TRAIN * 255, data_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="field of every record"):
        Evaluator(TRAIN, data_range=(0.0, 1.0), metrics={"f_mem": lambda g: 0.0})
    with pytest.raises(TypeError, match="function"):
        Evaluator(TRAIN, data_range=(0.0, 1.0), metrics={"q": 1.0})
    with pytest.raises(TypeError, match="fid must be"):
        Evaluator(TRAIN, data_range=(0.0, 1.0), fid="inception")
    evaluator = Evaluator(TRAIN, data_range=(0.0, 1.0), bootstrap=10)
    with pytest.raises(ValueError, match="step"):
        evaluator.evaluate(with_copies(1, 4), step=-1)
    with pytest.raises(ValueError, match="shape"):
        evaluator.evaluate(torch.rand(4, 8, 8, 1), step=0)  # channels-last


def test_a_prebuilt_index_and_feature_space_images():
    index = NearestNeighbourIndex(TRAIN)
    evaluator = Evaluator(index, data_range=(0.0, 1.0), bootstrap=20)
    assert evaluator.index is index and evaluator.evaluate(with_copies(3, 12), step=0).f_mem == pytest.approx(0.25)
    features = Evaluator(TRAIN, data_range=(0.0, 1.0), bootstrap=20, feature_fn=lambda x: x.flatten(1)[:, :16])
    assert features.index.dim == 16 and features.can_show_train_images
    features.evaluate(with_copies(3, 12), step=0)
    assert torch.equal(features.train_images(torch.tensor([2])), TRAIN[2:3])  # kept: the index holds features
    assert torch.equal(features.first_train_images(5), TRAIN[:5])

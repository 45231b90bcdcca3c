"""Argument validation: numpy/torch scalars accepted, non-integral counts refused, clear data_range errors,
a schedule that never fires within max_steps warned about at the start of training."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import FID, EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
from lightning_memwatch._checks import check_data_range, check_float, check_int
from lightning_memwatch.metrics.knn import NearestNeighbourIndex
from lightning_memwatch.metrics.memorization import MemorizationFraction, memorization_fraction

THIRD = [np.float32(1 / 3), np.float64(1 / 3), torch.tensor(1 / 3), torch.tensor(1 / 3, dtype=torch.float64)]
COUNT = [np.int64(50), np.int32(50), torch.tensor(50), np.float64(50.0), 50.0]


@pytest.fixture(scope="module")
def train() -> torch.Tensor:
    return torch.randn(20, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("threshold", THIRD)
def test_numpy_and_torch_thresholds_are_accepted(threshold, train):
    # were refused with "threshold must be a number in (0, 1]; got np.float32(0.33333334)": out of range?
    assert memorization_fraction(train[:4], train, threshold=threshold, bootstrap=10).threshold == pytest.approx(1 / 3)
    assert MemorizationFraction(train, threshold=threshold).threshold == pytest.approx(1 / 3)
    watch = MemWatch(threshold=threshold, verbose=False)
    assert type(watch.threshold) is float and watch.threshold == pytest.approx(1 / 3)


@pytest.mark.parametrize("count", COUNT)
def test_numpy_and_torch_counts_are_accepted(count, train):
    assert memorization_fraction(train[:4], train, bootstrap=count).fraction >= 0
    assert NearestNeighbourIndex(train, block_size=count, backend="torch").block_size == 50
    watch = MemWatch(num_samples=count, sample_batch_size=count, bootstrap=count, seed=count, verbose=False)
    assert (watch.num_samples, watch.sample_batch_size, watch.bootstrap, watch.seed) == (50, 50, 50, 50)
    assert type(watch.num_samples) is int
    assert TimescaleDetector(patience=count).patience == 50
    assert FID(batch_size=count, num_samples=count, cache=False).batch_size == 50


@pytest.mark.parametrize("count", [np.float64(50.5), 50.5, torch.tensor(50.5)])
def test_non_integral_counts_are_refused_not_truncated(count, train):
    with pytest.raises(ValueError, match="num_samples must be an int >= 2 .*non-integral"):
        MemWatch(num_samples=count)
    with pytest.raises(ValueError, match="bootstrap must be a positive int .*non-integral"):
        memorization_fraction(train[:4], train, bootstrap=count)
    with pytest.raises(MisconfigurationException, match="patience.*non-integral"):
        MemorizationEarlyStopping(MemWatch(verbose=False), patience=count)


def test_wrong_types_and_ranges_get_different_messages(train):
    with pytest.raises(TypeError, match="threshold must be a number in \\(0, 1\\].*got str"):
        memorization_fraction(train[:4], train, threshold="1/3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threshold must be a number in \\(0, 1\\].*got 2.0"):
        MemWatch(threshold=np.float32(2.0))
    with pytest.raises(TypeError, match="bool"):
        MemWatch(num_samples=True)  # type: ignore[arg-type]
    assert check_int(np.uint8(3), "n", minimum=0) == 3
    assert check_float(torch.tensor([0.5]).squeeze(), "x", low=0, high=1) == 0.5
    with pytest.raises(TypeError, match="got Tensor"):
        check_int(torch.tensor([1, 2]), "n")  # a vector is not a count


@pytest.mark.parametrize(
    "data_range, message",
    [
        ((-float("inf"), float("inf")), "two finite numbers"),  # was accepted
        ((0.0, float("nan")), "two finite numbers"),
        ((0.0, 1.0, 2.0), "pair \\(low, high\\).*got 3 values"),  # was "too many values to unpack"
        ((1.0,), "pair \\(low, high\\).*got 1 values"),
        ((1.0, 0.0), "high > low"),
        (1.0, "pair \\(low, high\\)"),
        ("01", "pair \\(low, high\\)"),
    ],
)
def test_bad_data_range_gets_a_clear_error(data_range, message):
    with pytest.raises((TypeError, ValueError), match=message):
        MemWatch(data_range=data_range)


def test_numpy_and_torch_data_ranges_are_accepted():
    assert MemWatch(data_range=np.array([0.0, 1.0]), verbose=False).data_range == (0.0, 1.0)
    assert MemWatch(data_range=torch.tensor([-1.0, 1.0]), verbose=False).data_range == (-1.0, 1.0)
    assert check_data_range((np.float32(-0.5), torch.tensor(0.5))) == (-0.5, 0.5)


def _fit(tmp_path, schedule, max_steps):
    train = toy_images(32)
    watch = MemWatch(num_samples=8, sample_batch_size=8, schedule=schedule, bootstrap=10, verbose=False)
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=[watch],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ToyDiffusion(train), toy_loader(train))
    return watch, [str(w.message) for w in caught if "never fires" in str(w.message)]


def test_a_schedule_entirely_past_max_steps_is_warned_about(tmp_path):
    watch, warned = _fit(tmp_path, EvalSchedule.at([100, 200]), max_steps=4)
    assert watch.history == []
    assert len(warned) == 1 and "EvalSchedule(steps=[100, 200]" in warned[0] and "max_steps=4" in warned[0]
    watch, warned = _fit(tmp_path, EvalSchedule.at([4, 200]), max_steps=4)
    assert [r["step"] for r in watch.history] == [4] and warned == []


def test_next_within_counts_the_current_step_and_no_end():
    schedule = EvalSchedule.at([10, 20])
    assert schedule.next_within(10, 10) == 10 and schedule.next_within(11, 20) == 20
    assert schedule.next_within(11, 19) is None and schedule.next_within(0, -1) == 10
    assert EvalSchedule.every(5).next_within(0, -1) == 5 and EvalSchedule.every(5).next_within(0, 4) is None


# -- one exception policy (issue 12): every configuration error is a ValueError/TypeError and a Lightning
# MisconfigurationException, raised through lightning_memwatch._checks ----------------------------------------
def test_config_errors_are_caught_as_value_error_and_as_misconfiguration():
    from lightning_memwatch import _checks
    from lightning_memwatch.adaptive import AdaptiveSchedule
    from lightning_memwatch.weights import resolve_weights

    cases = [
        (lambda: TimescaleDetector(quality_mode="mn"), "quality_mode must be one of 'min', 'max'; got 'mn'"),
        (lambda: TimescaleDetector(rel_tol=-0.5), r"rel_tol must be a number in \[0, inf\); got -0.5"),
        (lambda: AdaptiveSchedule(min_every=10, max_every=100, signal="loss"), "signal must be one of .*got 'loss'"),
        (lambda: FID(resize="nearest", cache=False), "resize must be one of 'bilinear-antialias', 'tf1-bilinear'"),
        (lambda: EvalSchedule.coerce("weekly"), "named schedules are 'auto' and 'paper'"),
        (lambda: resolve_weights("ema", None, None), "one of 'auto', 'raw', 'averaged'; got 'ema'. Or pass ModuleEMA"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            make()
        assert isinstance(info.value, MisconfigurationException) and type(info.value) is _checks.ConfigError
    with pytest.raises(TypeError, match="must be a torch.Tensor") as type_info:
        _checks.check_float_tensor([1.0], "x")
    assert isinstance(type_info.value, MisconfigurationException) and type(type_info.value) is _checks.ConfigTypeError
    assert not isinstance(type_info.value, ValueError)  # a wrong type is not a wrong value


def test_check_choice_lists_the_allowed_values_and_the_value_received():
    from lightning_memwatch._checks import check_choice

    assert check_choice("max", "mode", ("min", "max")) == "max"
    assert check_choice(np.int64(2048), "feature_layer", (64, 2048)) == 2048
    for bad in (True, "MAX", None, torch.tensor([1, 2]), 2048.5):
        with pytest.raises(ValueError, match=r"feature_layer must be one of 64, 2048, 1; got .*\. Pick one\."):
            check_choice(bad, "feature_layer", (64, 2048, 1), hint="Pick one.")


def test_config_errors_survive_pickling():
    """They cross DDP processes (the "one import-free error policy" is checked in tests/test_import_purity.py)."""
    import pickle

    from lightning_memwatch import _checks

    error = pickle.loads(pickle.dumps(_checks.config_error("n must be >= 1; got 0.")))  # crosses DDP processes
    assert type(error) is _checks.ConfigError and str(error) == "n must be >= 1; got 0."


def test_an_endless_training_stream_fails_at_setup_naming_train_data(tmp_path, monkeypatch):
    from torch.utils.data import DataLoader, IterableDataset

    from lightning_memwatch import images

    class Endless(IterableDataset):  # a streaming loader that repeats forever, as Lightning can train on
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            while True:
                yield torch.rand(1, 8, 8, generator=g) * 2 - 1

    monkeypatch.setattr(images, "stream_limit", lambda: 2**20)  # 1 MiB: 4,096 images of 1 x 8 x 8
    model = ToyDiffusion(toy_images(16))
    trainer = Trainer(max_steps=2, callbacks=[MemWatch(verbose=False)], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                      default_root_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"without ending.*MemWatch\(train_data=\.\.\.\)"):
        trainer.fit(model, DataLoader(Endless(), batch_size=4))
    assert trainer.global_step == 0

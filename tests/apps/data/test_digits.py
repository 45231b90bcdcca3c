"""scikit-learn digits datamodule: real offline images, disjoint split, rescaling, labels."""

from __future__ import annotations

import pytest
import torch

from lightning_memwatch.apps.data import DigitsDataModule, load_digits_unit


def _setup(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup()
    return dm


def test_real_digits_split_and_range() -> None:
    images, labels = load_digits_unit()
    assert images.shape == (1797, 1, 8, 8) and labels.shape == (1797,)
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    dm = _setup(n=256, num_heldout=512)
    train, heldout = dm.train_images(), dm.heldout_images()
    assert train.shape == (256, 1, 8, 8) and heldout.shape == (512, 1, 8, 8)
    assert dm.data_range == (-1.0, 1.0) and float(train.min()) >= -1 and float(train.max()) <= 1
    assert set(dm.train_indices.tolist()).isdisjoint(dm.heldout_indices.tolist())
    assert torch.equal(train, images[dm.train_indices] * 2 - 1)
    assert torch.equal(dm.train_labels(), labels[dm.train_indices])
    assert dm.heldout_labels().shape == (512,) and set(dm.heldout_labels().tolist()) == set(range(10))
    assert dm.batch_size == 256 and torch.equal(dm.reference_images(), heldout)


def test_training_sets_nest_and_slices_are_disjoint() -> None:
    small, big = _setup(n=64), _setup(n=128)
    assert torch.equal(big.train_images()[:64], small.train_images())
    second = _setup(n=64, index=1)
    assert torch.equal(big.train_images()[64:], second.train_images())
    assert torch.equal(small.heldout_images(), big.heldout_images())
    assert not torch.equal(_setup(n=64, split_seed=1).train_images(), small.train_images())


def test_center_normalization_and_upscaling() -> None:
    dm = _setup(n=100, normalization="center", image_size=32)
    train = dm.train_images()
    assert train.shape == (100, 1, 32, 32) and dm.sample_shape == (1, 32, 32)
    assert abs(float(train.mean())) < 1e-5
    lo, hi = dm.data_range
    assert lo == pytest.approx(-dm.mean) and hi == pytest.approx(1 - dm.mean)
    assert float(train.min()) >= lo - 1e-6 and float(train.max()) <= hi + 1e-6


def test_errors() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        DigitsDataModule(n=1300, num_heldout=512)
    with pytest.raises(ValueError, match="image_size"):
        DigitsDataModule(image_size=4)

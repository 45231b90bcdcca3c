"""Two-Gaussian mixture data: statistics, determinism, batching."""

from __future__ import annotations

import pytest
import torch

from lightning_memwatch.apps.data import GMMDataModule, sample_two_gaussians


def test_statistics_of_the_two_clusters() -> None:
    x = sample_two_gaussians(4096, 16, mu=1.0, sigma=1.0, generator=torch.Generator().manual_seed(0))
    plus, minus = x[:2048], x[2048:]
    assert plus.mean().item() == pytest.approx(1.0, abs=0.03)
    assert minus.mean().item() == pytest.approx(-1.0, abs=0.03)
    assert plus.std(dim=0).mean().item() == pytest.approx(1.0, abs=0.03)
    # every coordinate is offset (mean vector = +-mu * 1_d), not just the average
    assert bool((plus.mean(dim=0) > 0.8).all()) and bool((minus.mean(dim=0) < -0.8).all())
    wide = sample_two_gaussians(2000, 4, mu=3.0, sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert wide[:1000].mean().item() == pytest.approx(3.0, abs=0.05)
    assert wide[:1000].std().item() == pytest.approx(0.5, abs=0.03)
    with pytest.raises(ValueError, match="even"):
        sample_two_gaussians(5, 2)


def test_datamodule_seed_heldout_batching() -> None:
    dm = GMMDataModule(dim=8, n=1030, seed=1, num_heldout=64)
    dm.setup()
    again = GMMDataModule(dim=8, n=1030, seed=1, num_heldout=8)
    again.setup()
    other = GMMDataModule(dim=8, n=1030, seed=2)
    other.setup()
    assert torch.equal(dm.train_images(), again.train_images())  # training set independent of held-out size
    assert not torch.equal(dm.train_images(), other.train_images())
    assert dm.heldout_images().shape == (64, 8)
    assert not torch.equal(dm.heldout_images(), dm.train_images()[:64])
    assert dm.data_range is None and dm.sample_shape == (8,)
    assert dm.batch_size == 512  # min(512, n)
    sizes = [len(b) for b in dm.train_dataloader()]
    assert sizes == [512, 512, 6]  # drop_last=False: a smaller last batch, as the paper's loader
    assert GMMDataModule(n=256).batch_size == 256
    assert GMMDataModule(n=1024, full_batch=True).batch_size == 1024
    assert GMMDataModule(n=1024, batch_size=100).batch_size == 100
    with pytest.raises(ValueError, match="even"):
        GMMDataModule(n=7)


def test_several_passes_per_epoch_keep_each_pass_a_permutation() -> None:
    dm = GMMDataModule(dim=2, n=8, passes_per_epoch=5, num_heldout=2)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(len(b) == 8 for b in batches)
    rows = {tuple(r.tolist()) for r in dm.train_images()}
    for b in batches:
        assert {tuple(r.tolist()) for r in b} == rows
    dm2 = GMMDataModule(dim=2, n=10, batch_size=4, passes_per_epoch=2, num_heldout=2)
    dm2.setup()
    with pytest.warns(UserWarning, match="straddle"):
        dm2.train_dataloader()

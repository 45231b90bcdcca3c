"""The lucidrains adapter reproduces GaussianDiffusion's own DDIM from given noise and drives MemWatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("denoising_diffusion_pytorch")

from _tiny import Holder, images, one_evaluation, tiny_gaussian_diffusion  # noqa: E402

from lightning_memwatch.adapters import LucidrainsSampler  # noqa: E402


def test_lucidrains_sampler_drives_one_memwatch_evaluation(tmp_path):
    train = images(16, 0.0, 1.0)  # auto_normalize=True: the package's images live in [0, 1]
    watch = one_evaluation(tmp_path, Holder("diffusion", tiny_gaussian_diffusion()), LucidrainsSampler(), train, (0, 1))
    assert [r["step"] for r in watch.history] == [0]
    assert 0.0 <= watch.history[0]["f_mem"] <= 1.0


def test_lucidrains_sampler_matches_the_packages_ddim_given_the_same_initial_noise():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=5).eval()
    shape = (4, 1, 8, 8)
    torch.manual_seed(7)
    noise = torch.randn(shape)  # what ddim_sample draws first after the same seed
    torch.manual_seed(7)
    theirs = diffusion.ddim_sample(shape)
    ours = LucidrainsSampler(None)(diffusion, 4, noise=noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_lucidrains_sampler_independent_of_batch_size_and_leaves_global_rng_untouched():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=5).eval()
    sample_fn = LucidrainsSampler(None, data_range=(-1.0, 1.0))
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    whole = sample_fn(diffusion, 5, noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    parts = torch.cat([sample_fn(diffusion, 2, noise=noise[:2]), sample_fn(diffusion, 3, noise=noise[2:])])
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)
    assert whole.min() >= -1.0 and whole.max() <= 1.0 and whole.min() < 0.0  # mapped from (0, 1) to (-1, 1)


def test_lucidrains_ancestral_sampler_uses_the_generator_not_the_global_rng():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=None, timesteps=10).eval()  # no DDIM: ancestral
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    a = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(5), noise=noise)
    b = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(5), noise=noise)
    c = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(6), noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same generator, same computation: equal by construction
    assert (a - c).abs().max() > 1e-3


def test_lucidrains_sampler_names_what_is_missing():
    with pytest.raises(TypeError, match="GaussianDiffusion"):
        LucidrainsSampler(None)(torch.nn.Linear(2, 2), 2, noise=torch.zeros(2, 1, 8, 8))

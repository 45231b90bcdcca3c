"""DDPM maths: schedule, DDIM timesteps, forward process, the DDIM update against an exact denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_memwatch.apps.models.diffusion import (
    alphas_cumprod,
    ddim_sample,
    ddim_timesteps,
    linear_beta_schedule,
    q_sample,
)


def test_linear_schedule_matches_the_paper() -> None:
    betas = linear_beta_schedule(1000)
    assert betas.dtype == torch.float32 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999), atol=1e-9)
    half = linear_beta_schedule(500)  # scaled by 1000 / T
    assert half[0].item() == pytest.approx(2e-4) and half[-1].item() == pytest.approx(0.04)
    abar = alphas_cumprod(betas)
    assert abar[0].item() == pytest.approx(1 - 1e-4) and abar[-1].item() < 1e-4
    assert bool((abar.diff() < 0).all())
    with pytest.raises(ValueError, match="more timesteps"):
        linear_beta_schedule(10)


def test_ddim_timesteps_match_numpy_linspace_int() -> None:
    expected = np.linspace(0, 999, 100, dtype=int)[::-1]
    got = ddim_timesteps(1000, 100)
    assert got.dtype == torch.int64
    assert got.tolist() == expected.tolist()
    assert got[:2].tolist() == [999, 988] and got[-2:].tolist() == [10, 0]
    assert ddim_timesteps(1000, 7).tolist() == np.linspace(0, 999, 7, dtype=int)[::-1].tolist()
    with pytest.raises(ValueError, match="num_steps"):
        ddim_timesteps(1000, 1)


def test_q_sample_formula() -> None:
    abar = alphas_cumprod(linear_beta_schedule(1000))
    x0, noise = torch.ones(2, 3), torch.full((2, 3), 2.0)
    t = torch.tensor([0, 999])
    out = q_sample(x0, t, noise, abar)
    for row, step in enumerate(t.tolist()):
        a = abar[step]
        assert torch.allclose(out[row], a.sqrt() + 2 * (1 - a).sqrt())


def test_ddim_with_the_exact_denoiser_of_a_point_mass_ends_at_t0() -> None:
    """Data = one point x*: eps(x_t, t) = (x_t - sqrt(a_t) x*) / sqrt(1 - a_t) exactly; eta=0 DDIM keeps the
    initial noise direction and must end at sqrt(a_0) x* + sqrt(1 - a_0) eps_T (the update lands on t = 0)."""
    abar = alphas_cumprod(linear_beta_schedule(1000))
    target = torch.tensor([[0.3, -0.7, 0.1]])
    calls: list[int] = []

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(int(t[0]))
        a = abar[t].reshape(-1, 1)
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    before = noise.clone()
    steps = ddim_timesteps(1000, 100)
    out = ddim_sample(oracle, noise, abar, steps)
    assert torch.equal(noise, before)  # input untouched
    assert calls == steps[:-1].tolist()  # 99 denoiser calls, never at t = 0
    eps_T = (noise - abar[999].sqrt() * target) / (1 - abar[999]).sqrt()
    expected = abar[0].sqrt() * target + (1 - abar[0]).sqrt() * eps_T
    assert torch.allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="decreasing"):
        ddim_sample(oracle, noise, abar, torch.tensor([0, 10]))

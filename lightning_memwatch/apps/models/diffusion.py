"""Discrete DDPM (variance-preserving) maths shared by every recipe model: no Lightning, no network.

Conventions follow the paper's code (``paper_protocol.md`` section 3):

* ``T`` diffusion steps indexed ``t = 0 .. T-1``; ``beta_t`` linear from ``1e-4`` to ``0.02`` scaled by
  ``1000 / T``, computed in float32; ``alpha_bar_t = prod_{s <= t} (1 - beta_s)``.
* Forward process ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps``.
* Evaluation sampler: deterministic DDIM (eta = 0) on ``S`` timesteps ``int(linspace(0, T-1, S))`` visited in
  decreasing order. The update from the last pair goes *to* ``t = 0`` (not to a clean ``t = -1``), so ``S``
  timesteps mean ``S - 1`` denoiser evaluations and a residual noise term of std ``sqrt(1 - alpha_bar_0)``
  (0.01 for the default schedule), exactly as the authors' ``sample_diffusion_from_noise_DDIM``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""A noise predictor ``eps_hat = f(x_t, t)`` with ``t`` an int64 tensor of shape (B,)."""


def linear_beta_schedule(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """Linear beta schedule of Ho et al. (2020), rescaled by ``1000 / num_timesteps`` as in the paper's code.

    Args:
        num_timesteps: Number of diffusion steps ``T`` (steps).
        beta_start: ``beta_0`` for ``T = 1000``.
        beta_end: ``beta_{T-1}`` for ``T = 1000``.

    Returns:
        Float32 tensor of shape (T,).
    """
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2; got {num_timesteps}.")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(
            f"Need 0 < beta_start < beta_end < 1; got beta_start={beta_start}, beta_end={beta_end}."
        )
    scale = 1000.0 / num_timesteps
    if beta_end * scale >= 1.0:
        raise ValueError(
            f"beta_end * 1000 / num_timesteps = {beta_end * scale:.3g} >= 1: "
            "use more timesteps or a smaller beta_end."
        )
    return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float32)


def alphas_cumprod(betas: Tensor) -> Tensor:
    """``alpha_bar_t = prod_{s <= t} (1 - beta_s)``, same dtype and shape as ``betas``."""
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> Tensor:
    """The DDIM timesteps, decreasing: ``int(linspace(0, T-1, S))`` reversed, e.g. (999, 988, ..., 10, 0).

    Computed in float64 and truncated toward zero, as ``numpy.linspace(..., dtype=int)`` does.

    Args:
        num_timesteps: ``T`` (steps).
        num_steps: ``S``, the number of timesteps visited (``S - 1`` denoiser evaluations), 2 <= S <= T.

    Returns:
        Int64 tensor of shape (S,).
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must lie in [2, num_timesteps={num_timesteps}]; got {num_steps}.")
    grid = torch.linspace(0.0, float(num_timesteps - 1), num_steps, dtype=torch.float64)
    return grid.long().flip(0)


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alpha_bar: Tensor) -> Tensor:
    """Forward diffusion ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise`` (new tensor).

    Args:
        x0: Clean data (B, ...).
        t: Int64 timesteps (B,).
        noise: Standard normal noise, same shape as ``x0``.
        alpha_bar: Cumulative products (T,), on ``x0``'s device.
    """
    a = alpha_bar.to(x0.dtype)[t].reshape(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def ddim_sample(denoiser: Denoiser, noise: Tensor, alpha_bar: Tensor, timesteps: Tensor) -> Tensor:
    """Deterministic DDIM (eta = 0) from ``noise`` along decreasing ``timesteps``; returns ``x`` at the last.

    Each update predicts ``x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)`` and moves to
    ``x = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps``. No clipping (the paper's sampler does not clip).

    Args:
        denoiser: ``eps_hat = denoiser(x_t, t)``; called ``len(timesteps) - 1`` times.
        noise: Initial ``x_T`` (B, ...), not modified.
        alpha_bar: Cumulative products (T,) on ``noise``'s device.
        timesteps: Int64 decreasing timesteps (S,), e.g. from :func:`ddim_timesteps`.

    Returns:
        Samples with the shape, dtype and device of ``noise``.
    """
    if timesteps.ndim != 1 or len(timesteps) < 2:
        raise ValueError(f"timesteps must be 1-D with >= 2 entries; got shape {tuple(timesteps.shape)}.")
    steps = [int(s) for s in timesteps.tolist()]
    if any(b >= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"timesteps must be strictly decreasing; got {steps[:5]}...")
    x = noise
    batch = noise.shape[0]
    a_bar = alpha_bar.to(device=noise.device, dtype=torch.float32)
    for t, t_prev in zip(steps, steps[1:], strict=False):
        t_batch = torch.full((batch,), t, dtype=torch.long, device=noise.device)
        eps = denoiser(x, t_batch).to(torch.float32)
        a_t, a_prev = a_bar[t], a_bar[t_prev]
        x0 = (x.to(torch.float32) - (1.0 - a_t).sqrt() * eps) / a_t.sqrt()
        x = (a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps).to(noise.dtype)
    return x

"""Two-Gaussian mixture data of the paper's appendix (``paper_protocol.md`` section 1.2).

Exactly ``n / 2`` points around ``+mu * 1_d`` and ``n / 2`` around ``-mu * 1_d`` (every coordinate equals
``+-mu``), isotropic standard deviation ``sigma``; ``mu = sigma = 1`` in the paper, no normalisation.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_memwatch.apps.data.base import TensorDataModule


def sample_two_gaussians(
    n: int, dim: int, mu: float = 1.0, sigma: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """``n`` points (n, dim): the first ``n / 2`` from N(+mu 1, sigma^2 I), the rest from N(-mu 1, sigma^2 I).

    Args:
        n: Number of points (even).
        dim: Dimension ``d``.
        mu: Offset of each mean along every coordinate.
        sigma: Standard deviation of each coordinate.
        generator: Source of randomness.
    """
    if n < 2 or n % 2:
        raise ValueError(f"n must be even and >= 2 (n/2 points per Gaussian); got {n}.")
    if dim < 1 or sigma <= 0:
        raise ValueError(f"Need dim >= 1 and sigma > 0; got dim={dim}, sigma={sigma}.")
    signs = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)])[:, None]
    return signs * mu + sigma * torch.randn(n, dim, generator=generator)


class GMMDataModule(TensorDataModule):
    """Two-Gaussian mixture in ``dim`` dimensions; a fresh held-out draw from the same mixture.

    Args:
        dim: Dimension ``d`` (the paper: 8, 16, 32).
        n: Training set size (even; the paper: 256 .. 4096).
        mu: Mean offset per coordinate (1 in the paper).
        sigma: Per-coordinate standard deviation (1 in the paper).
        seed: Dataset seed (the paper's ``-s``); the training set depends on it and ``n`` only.
        num_heldout: Held-out points (even), drawn after the training set.
        batch_size: See :class:`~lightning_memwatch.apps.data.base.TensorDataModule` (the paper's example: 512).
        max_batch_size: See the base class.
        full_batch: See the base class.
        num_workers: See the base class.
        pin_memory: See the base class.
        passes_per_epoch: See the base class (1: the paper's loader).
    """

    def __init__(
        self,
        dim: int = 8,
        n: int = 1024,
        mu: float = 1.0,
        sigma: float = 1.0,
        seed: int = 1,
        num_heldout: int = 2048,
        batch_size: int | None = None,
        max_batch_size: int = 512,
        full_batch: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(n, batch_size, max_batch_size, full_batch, num_workers, pin_memory, passes_per_epoch)
        if n % 2 or num_heldout < 2 or num_heldout % 2:
            raise ValueError(
                f"n and num_heldout must be even (half per Gaussian); got n={n}, num_heldout={num_heldout}."
            )
        self.dim = dim
        self.mu = mu
        self.sigma = sigma
        self.seed = seed
        self.num_heldout = num_heldout

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def build(self) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
        generator = torch.Generator().manual_seed(self.seed)
        train = sample_two_gaussians(self.n, self.dim, self.mu, self.sigma, generator)
        heldout = sample_two_gaussians(self.num_heldout, self.dim, self.mu, self.sigma, generator)
        return train, heldout, None

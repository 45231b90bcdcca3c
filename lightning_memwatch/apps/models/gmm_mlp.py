"""Residual MLP denoiser with a discrete time encoding, for vector data (the paper's GMM model, section 2.2).

``Linear(d, width) -> num_blocks x TimeResidualBlock -> Linear(width, d)``, where each block adds a fixed
sinusoidal encoding of ``t`` to its input, applies ``Linear -> GELU -> Linear`` and returns
``LayerNorm(x + out)`` (the residual skips the encoding). With ``width=128`` and 3 blocks it has
102,024 / 104,080 / 108,192 parameters for d = 8 / 16 / 32, the paper's ~0.10 M.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def interleaved_time_encoding(max_len: int, dim: int, min_freq: float = 1e-4) -> Tensor:
    """Transformer-style encoding: (t, k) is cos (k even) or sin (k odd) of ``t * min_freq^(2(k//2)/dim)``.

    Args:
        max_len: Rows (largest t + 1).
        dim: Encoding width.
        min_freq: Lowest angular frequency.

    Returns:
        Float32 tensor (max_len, dim).
    """
    k = torch.arange(dim, dtype=torch.float64)
    freqs = min_freq ** (2 * torch.div(k, 2, rounding_mode="floor") / dim)
    angles = torch.arange(max_len, dtype=torch.float64)[:, None] * freqs[None, :]
    enc = torch.empty_like(angles)
    enc[:, 0::2] = angles[:, 0::2].cos()
    enc[:, 1::2] = angles[:, 1::2].sin()
    return enc.float()


class TimeResidualBlock(nn.Module):
    """``LayerNorm(x + Linear(GELU(Linear(x + enc(t)))))`` with a fixed (non-trainable) encoding ``enc``."""

    def __init__(self, width: int, max_len: int = 10000) -> None:
        super().__init__()
        self.register_buffer("encoding", interleaved_time_encoding(max_len, width), persistent=False)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.fc2(self.act(self.fc1(x + self.encoding[t].to(x.dtype))))
        return self.norm(x + out)


class ResidualMLP(nn.Module):
    """Noise predictor ``eps_hat = ResidualMLP(x_t, t)`` for vectors (B, dim) or small images (flattened).

    Args:
        dim: Data dimension ``d``.
        width: Hidden width (the paper's ``d_model``, 128).
        num_blocks: Residual blocks (3 in the paper).
        max_len: Largest timestep + 1 the encoding covers (must exceed ``T - 1``).
        num_classes: class-conditional: a learned class embedding (``num_classes`` rows) is added to the input
            projection, and :meth:`forward` takes ``labels``; None (default): unconditional.
    """

    def __init__(
        self, dim: int = 8, width: int = 128, num_blocks: int = 3, max_len: int = 10000, num_classes: int | None = None
    ) -> None:
        super().__init__()
        if dim < 1 or width < 2 or num_blocks < 1:
            raise ValueError(f"Need dim >= 1, width >= 2, num_blocks >= 1; got {dim}, {width}, {num_blocks}.")
        self.dim = dim
        self.max_len = max_len
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(TimeResidualBlock(width, max_len) for _ in range(num_blocks))
        self.out = nn.Linear(width, dim)
        self.num_classes = num_classes
        self.class_embedding = None if num_classes is None else nn.Embedding(num_classes, width)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in ``x`` at integer timesteps ``t`` (B,), for classes ``labels`` (B,) when the
        model is class-conditional (None: no class term).

        ``x`` is (B, dim) or any (B, *shape) with ``prod(shape) == dim`` (e.g. 8x8 images with dim=64): it is
        flattened in and the output reshaped back to ``x``'s shape.
        """
        flat = torch.flatten(x, start_dim=1) if x.ndim > 2 else x
        if flat.ndim != 2 or flat.shape[1] != self.dim:
            raise ValueError(
                f"ResidualMLP(dim={self.dim}) expects (B, {self.dim}) or (B, *shape) with {self.dim} "
                f"entries per row; got shape {tuple(x.shape)}. Set dim to the number of entries per sample."
            )
        t = t.reshape(-1).long()
        h = self.inp(flat)
        if labels is not None and self.class_embedding is not None:
            h = h + self.class_embedding(labels.reshape(-1).long())
        for block in self.blocks:
            h = block(h, t)
        return self.out(h).reshape(x.shape)

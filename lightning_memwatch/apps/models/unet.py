"""The paper's noise-predicting U-Net (``paper_protocol.md`` section 2.1), written from its description.

Layout for the default ``channel_mults=(1, 2, 4)`` at 32x32 input and base width ``W``::

    stem conv3x3 1->W                                    (skip)
    32px: 2 x ResBlock(W)                                (skip after each), conv3x3 stride 2 (skip)
    16px: 2 x ResBlock(2W) + attention                   (skip after each), conv3x3 stride 2 (skip)
     8px: 2 x ResBlock(4W) + attention                   (skip after each)
    bottleneck 8px: ResBlock(4W) + attention, ResBlock(4W)
     8px: 3 x ResBlock(4W) + attention, each on [h, skip], then nearest x2 + conv3x3
    16px: 3 x ResBlock(2W) + attention, each on [h, skip], then nearest x2 + conv3x3
    32px: 3 x ResBlock(W), each on [h, skip]
    head GroupNorm(8) -> SiLU -> conv3x3 W->1

ResBlock (pre-activation): GN(8) -> SiLU -> conv3x3; + Linear(SiLU(temb)) as a per-channel bias;
GN(8) -> SiLU -> Dropout2d(p) -> conv3x3; + (1x1 conv of) the input; then optional attention
(GN(8) pre-norm, 4-head ``nn.MultiheadAttention`` over the H*W positions, residual).

Time embedding: a frozen sinusoidal table of dimension W over t = 0..T-1 (base 10000, [sin | cos]),
then Linear(W, 4W) -> GELU -> Linear(4W, 4W).

Trainable parameters: 4,023,233 at W = 32 (``count_parameters``), matching the 4.023 M derived from the
authors' code; the frozen table adds 1000 * W (4,055,233 in all, what their script prints).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sinusoidal_table(num_timesteps: int, dim: int, base: float = 10000.0) -> Tensor:
    """Fixed sinusoidal table of t = 0..T-1.

    Row t is ``[sin(t f_k), cos(t f_k)]`` for ``k < dim / 2`` with ``f_k = base^(-k / (dim / 2 - 1))``.

    Args:
        num_timesteps: Rows ``T``.
        dim: Embedding width (even, >= 4).
        base: Frequency base.

    Returns:
        Float32 tensor (T, dim).
    """
    if dim < 4 or dim % 2:
        raise ValueError(f"dim must be even and >= 4; got {dim}.")
    half = dim // 2
    freqs = torch.exp(-math.log(base) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = torch.arange(num_timesteps, dtype=torch.float32)[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class TimeEmbedding(nn.Module):
    """Frozen sinusoidal lookup of integer t, then a 2-layer MLP (GELU) to ``out_dim``."""

    def __init__(self, num_timesteps: int, dim: int, out_dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding.from_pretrained(sinusoidal_table(num_timesteps, dim), freeze=True)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.table(t))


class SelfAttention2d(nn.Module):
    """GroupNorm pre-norm, multi-head self-attention over the H*W positions, residual.

    The weights are those of ``nn.MultiheadAttention`` (fused in-projection with bias, out-projection), as in
    the authors' model; the product is computed with ``F.scaled_dot_product_attention`` (fused kernels:
    ~2.5x faster than ``nn.MultiheadAttention``'s inference path on CPU, same result).
    """

    def __init__(self, channels: int, num_heads: int = 4, groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.attn = nn.MultiheadAttention(channels, num_heads, batch_first=True)
        self.num_heads = num_heads

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        seq = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        qkv = F.linear(seq, self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = (z.reshape(b, h * w, self.num_heads, -1).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = self.attn.out_proj(out)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """Pre-activation residual block: time-embedding bias, dropout before the 2nd conv, optional attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        time_dim: int,
        *,
        dropout: float = 0.1,
        attention: bool = False,
        num_heads: int = 4,
        groups: int = 8,
    ) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout2d(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip: nn.Module = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        )
        self.attn: nn.Module = (
            SelfAttention2d(out_channels, num_heads, groups) if attention else nn.Identity()
        )
        self.act = nn.SiLU()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_proj(self.act(temb))[:, :, None, None]
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.attn(h + self.skip(x))


class UNet(nn.Module):
    """Noise-prediction U-Net of the paper: ``eps_hat = UNet(x_t, t)``.

    Args:
        base_width: ``W``, channels at the top level; a multiple of ``groups`` (8). W = 32 gives ~4.02 M
            trainable parameters (the paper's main CelebA model).
        in_channels: Image channels (1 for the paper's grayscale CelebA); the output has the same count.
        channel_mults: Width multipliers per resolution level (one level per entry; downsampling x2 between).
        attention: Per level, whether each ResBlock there (encoder and decoder) is followed by attention.
        num_res_blocks: ResBlocks per level in the encoder (the decoder uses one more).
        dropout: Dropout2d probability inside each ResBlock (active in train mode only).
        num_timesteps: ``T``: rows of the time table; ``t`` must lie in [0, T).
        num_heads: Attention heads.
        groups: GroupNorm groups.
        num_classes: class-conditional: a learned class embedding (``num_classes`` rows) is added to the time
            embedding, and :meth:`forward` takes ``labels``; None (default, the paper): unconditional.

    Input ``x`` is (B, in_channels, H, W) with H and W divisible by ``2 ** (len(channel_mults) - 1)``;
    ``t`` is an int64 tensor (B,). Output has the shape of ``x``.
    """

    def __init__(
        self,
        base_width: int = 32,
        in_channels: int = 1,
        channel_mults: Sequence[int] = (1, 2, 4),
        attention: Sequence[bool] = (False, True, True),
        num_res_blocks: int = 2,
        dropout: float = 0.1,
        num_timesteps: int = 1000,
        num_heads: int = 4,
        groups: int = 8,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if base_width <= 0 or base_width % groups:
            raise ValueError(f"base_width must be a positive multiple of groups={groups}; got {base_width}.")
        if len(channel_mults) != len(attention) or not channel_mults:
            raise ValueError(
                f"channel_mults and attention need one entry per level; got {list(channel_mults)} "
                f"and {list(attention)}."
            )
        if any(base_width * m % num_heads for m in channel_mults):
            raise ValueError(f"Every level width must be divisible by num_heads={num_heads}.")
        self.in_channels = in_channels
        self.num_levels = len(channel_mults)
        self.num_timesteps = num_timesteps
        time_dim = 4 * base_width
        block = dict(dropout=dropout, num_heads=num_heads, groups=groups)

        self.time_embedding = TimeEmbedding(num_timesteps, base_width, time_dim)
        self.num_classes = num_classes
        self.class_embedding = None if num_classes is None else nn.Embedding(num_classes, time_dim)
        self.stem = nn.Conv2d(in_channels, base_width, 3, padding=1)

        skips = [base_width]
        ch = base_width
        self.down = nn.ModuleList()
        for level, (mult, attn) in enumerate(zip(channel_mults, attention, strict=True)):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(ch, base_width * mult, time_dim, attention=attn, **block))
                ch = base_width * mult
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skips.append(ch)

        self.middle = nn.ModuleList(
            [
                ResBlock(ch, ch, time_dim, attention=True, **block),
                ResBlock(ch, ch, time_dim, attention=False, **block),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            out = base_width * channel_mults[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(ch + skips.pop(), out, time_dim, attention=attention[level], **block))
                ch = out
            if level > 0:
                self.up.append(
                    nn.Sequential(
                        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)
                    )
                )

        self.head = nn.Sequential(
            nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1)
        )

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        """Predict the noise in ``x`` (B, C, H, W) at integer timesteps ``t`` (B,), for classes ``labels`` (B,)
        when the model is class-conditional (None: no class term)."""
        factor = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(
                f"UNet expects (B, {self.in_channels}, H, W) with H, W divisible by {factor}; "
                f"got shape {tuple(x.shape)}."
            )
        temb = self.time_embedding(t.reshape(-1).long())
        if labels is not None and self.class_embedding is not None:
            temb = temb + self.class_embedding(labels.reshape(-1).long())
        h = self.stem(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        for layer in self.middle:
            h = layer(h, temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.head(h)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

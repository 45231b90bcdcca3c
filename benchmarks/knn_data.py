"""Data of the kNN benchmarks (one home for ``knn.py``, ``knn_parity.py``, ``knn_scale.py``).

``make_data(m, n, d, seed, kind)`` returns ``(train, queries)``, float32:

* ``uniform``: rows uniform in [0, 1];
* ``lowrank``: an image-like set of low intrinsic dimension (rank-16 structure squashed into [0, 1], 1% noise);
* ``digits``: scikit-learn's 1,797 real 8x8 digits, upsampled (bilinear) to ``d`` pixels, shifted by up to 2
  pixels, 1% noise, in [0, 1];
* ``saturated``: near-tie-dense images: rank-16 structure plus 1% noise, clipped to [0, 1] so that about half
  of the pixels are exactly 1.0 (clipped highlights, flat white backgrounds), where many training rows lie
  within the float32 bound of the k-th neighbour.

Queries: 10% exact copies of training rows, 20% near copies (structured kinds), the rest new.
"""

from __future__ import annotations

import math

import torch

KINDS = ("uniform", "lowrank", "digits", "saturated")


def make_data(m: int, n: int, d: int, seed: int, kind: str = "uniform") -> tuple[torch.Tensor, torch.Tensor]:
    """``(train (n, d), queries (m, d))`` of the given kind (see the module notes)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        train = torch.rand(n, d, generator=g)
        queries = torch.rand(m, d, generator=g)
    else:
        if kind == "digits":
            train, queries = _digits(n, g, d), _digits(m, g, d)
        elif kind in ("lowrank", "saturated"):
            basis = torch.randn(16, d, generator=g) / 4
            train, queries = _lowrank(n, g, basis, kind), _lowrank(m, g, basis, kind)
        else:
            raise SystemExit(f"unknown data kind {kind!r}; one of {KINDS}")
        near = torch.randint(0, n, (m // 5,), generator=g)
        queries[m // 10 : m // 10 + m // 5] = (train[near] + 0.02 * torch.randn(m // 5, d, generator=g)).clamp(0, 1)
    queries[: m // 10] = train[torch.randint(0, n, (m // 10,), generator=g)]
    return train, queries


def _lowrank(rows: int, g: torch.Generator, basis: torch.Tensor, kind: str) -> torch.Tensor:
    z = torch.randn(rows, basis.shape[0], generator=g) @ basis
    x = torch.sigmoid(z) if kind == "lowrank" else 1.0 + z  # saturated: about half of the pixels above 1
    return (x + 0.01 * torch.randn(rows, basis.shape[1], generator=g)).clamp(0, 1)


def _digits(rows: int, g: torch.Generator, d: int) -> torch.Tensor:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    side = math.isqrt(d)
    if side * side != d:
        raise SystemExit(f"--data digits needs a square --d (e.g. 1024 = 32 x 32); got {d}.")
    images = torch.from_numpy(load_digits().images).float()[:, None] / 16
    big = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    pick = big[torch.randint(0, len(big), (rows,), generator=g)]
    shifts = torch.randint(-2, 3, (rows, 2), generator=g)
    out = torch.stack([torch.roll(x, (int(a), int(b)), dims=(1, 2)) for x, (a, b) in zip(pick, shifts.tolist())])
    return (out.reshape(rows, d) + 0.01 * torch.randn(rows, d, generator=g)).clamp(0, 1)

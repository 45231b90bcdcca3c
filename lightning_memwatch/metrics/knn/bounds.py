r"""Rounding-error bounds of the fast passes: per query, per training row, and relative where the arithmetic is.

Notation: ``x`` a query and ``y`` a training row *as the fast pass sees them* (float32; centred on the float32
training mean ``mu`` when the index centres), ``X = ||x||``, ``Y = ||y||`` (float64 norms of the float32
vectors, known exactly enough: ``D 2**-53`` relative), ``u = 2**-24`` (float32), ``gamma_n = n u / (1 - n u)``.
Every pass computes an approximation ``a`` of ``d^2 = ||x - y||^2`` whose error obeys

    |a - d^2| <= rho |a| + eps(X, Y),   eps = c_xy X Y + c_yy Y^2 + c_xx X^2 + tiny(X),

so that ``lower = (1 - rho) a - eps`` and ``upper = max((1 + rho) a, (1 - rho) a) + eps`` bracket ``d^2``. The
coefficients below are multiplied by a safety factor of 1.25; ``tiny`` covers flushed subnormals
(``2**-118 D (1 + X + max Y)``; float32 and bfloat16 share the exponent range).

**float32 expansion** (``backend="torch"``). The GEMM returns ``s = fl(b - 2 x.y)`` with the per-row bias
``b = fl32(Y^2 - c_yy Y^2)`` (the ``Y^2`` part of ``eps`` is folded into the bias, so the scan's tile is
``lower`` directly) and the tile is then lowered by ``c_xy X Y`` (a rank-1 update); ``a = s + X^2`` with
``X^2`` in float64. Whatever the summation order and FMA use, a dot product of length ``D`` errs by at most
``gamma_D X Y`` (Cauchy-Schwarz on ``sum |x_i y_i|``); the bias, the scaling and the two elementwise updates
add at most ``8`` more roundings of terms bounded by ``Y^2 + 2 X Y`` (on CPU the GEMM may be oneDNN's, fed
``-2 x``: a power-of-two scaling, exact short of overflow, which the float64 pass takes). Hence ``rho = 0``, ``c_xy = 2
gamma_{D+8}``, ``c_yy = gamma_{D+8}``, ``c_xx = D 2**-50``. With TF32/bfloat16 matmul inputs (torch's matmul
precision below "highest"; ``allow_tf32`` on CUDA) of unit ``v``, ``c_xy += 4.01 v``.

**Centring.** ``x = fl32(q - mu)`` and ``y = fl32(t - mu)`` differ from the exact ``q - mu``, ``t - mu`` by at
most ``u`` relative per coordinate, so ``||(x - y) - (q - t)|| <= r = 1.01 u (X + Y)`` and ``|d_true^2 -
d^2| <= r (2 (X + Y) + r) <= 2.03 u (X + Y)^2``: ``c_xy += 4.06 u``, ``c_yy += 2.03 u``, ``c_xx += 2.03 u``.

**faiss** computes ``||x||^2`` itself in float32 and ``a = X^2 + Y^2 - 2 x.y`` with three float32 roundings
(or, for very few queries, ``sum (x_i - y_i)^2`` directly, which the same bound covers) and clamps
negative values to 0 (which keeps both brackets valid): ``c_xy = 2 gamma_{D+8}``, ``c_yy = c_xx =
gamma_{D+8}``.

**Split-bfloat16 screen** (``backend="torch-bf16"``). ``x = h + l + r`` with ``h = bf16(x)``, ``l = bf16(x -
h)``, ``|r_i| <= 2**-16 |x_i|`` (bfloat16's unit is ``2**-8``), likewise ``y = H + L + R``. One bfloat16 GEMM of
inner dimension ``K`` (``3 D`` plus 6 norm columns, padded to 32) sums ``h.H + h.L + l.H - X^2/2 - Y^2/2``
(the norms split in three bfloat16 parts, exact to ``u`` relative) and so approximates ``-d^2/2``:

* the dropped terms ``h.R + l.L + l.R + r.y`` are at most ``3.1 2**-16 X Y``;
* products of bfloat16 numbers are exact in float32; the float32 accumulation of ``K`` terms errs by at most
  ``gamma_K (1.03 X Y + X^2/2 + Y^2/2)`` with round-to-nearest. For cuBLAS the accumulation unit is taken
  as ``4 u``: NVIDIA tensor cores align the addends of a multi-term fused add to the largest exponent and
  truncate (Fasi, Higham, Mikaitis & Pranesh 2021), which at most doubles the unit, and the rest is margin;
* the norm parts add ``u (X^2 + Y^2) / 2`` (counted as ``4 u (X^2 + Y^2) / 2``);
* on CPU the result is rounded once to bfloat16: ``rho = 2**-8 / (1 - 2**-8)``, *relative to the
  distance itself*, since the sum is ``-d^2/2`` and not a difference of norms. On CUDA the GEMM returns the
  float32 accumulator (``torch.mm(..., out_dtype=torch.float32)``) and ``rho`` drops to ``3 u``;
* the float32 elementwise updates of the tile add ``3 u`` to ``rho``.

In ``d^2`` units (twice the above): ``c_xy = 2 (3.1 2**-16 + 1.03 gamma_K)``, ``c_yy = c_xx = gamma_K + 4 u``,
plus the centring terms. cuBLAS must not reduce in bfloat16 (``allow_bf16_reduced_precision_reduction`` is
turned off around the screen). Devices or torch builds that do not meet these assumptions use float32
(:func:`~lightning_memwatch.metrics.knn.backends.cuda_bf16_screen_ok`).

**float64 pass** (only for values that float32 cannot hold: a query or row with ``(X + max Y)^2 >= 2**120``):
the same expansion on the raw rows in float64, ``u = 2**-53``, ``tiny = 2**-1000``.

A row whose ``lower`` exceeds the running threshold (the ``k``-th smallest ``upper`` seen so far, which is at
least the true ``k``-th distance) is strictly farther than the true ``k``-th neighbour, so it can be skipped;
every other row is a candidate and gets an exact distance. The property tests in
``tests/metrics/test_knn_bounds.py`` check every bound against float64 on adversarial data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ErrorModel", "expansion_model", "faiss_model", "screen_model", "screen_width"]

SAFETY = 1.25
UNIT_FP32 = 2.0**-24
UNIT_FP64 = 2.0**-53
UNIT_BF16 = 2.0**-8
# (X + max Y)^2 at or above this goes to the float64 pass: every float32 partial sum stays finite below it.
FLOAT32_SAFE_SQ = 2.0**120


def _gamma(n: int, unit: float) -> float:
    return n * unit / (1 - n * unit)


def screen_width(dim: int) -> int:
    """Inner dimension of the screening GEMM: 3 D + 6 extra columns, padded to a multiple of 32."""
    return -(-(3 * dim + 6) // 32) * 32


@dataclass(frozen=True)
class ErrorModel:
    """``|a - d^2| <= rho |a| + c_xy X Y + c_yy Y^2 + c_xx X^2 + tiny (1 + X + max Y)`` (see the module notes)."""

    rho: float
    c_xy: float
    c_yy: float
    c_xx: float
    tiny: float

    def eps(self, x_norm: Tensor, y_norm: Tensor, y_max: float) -> Tensor:
        """The absolute part of the bound, float64, broadcast over ``x_norm`` and ``y_norm``."""
        return (
            self.c_xy * x_norm * y_norm
            + self.c_yy * y_norm * y_norm
            + self.c_xx * x_norm * x_norm
            + self.tiny * (1 + x_norm + y_max)
        )

    def lower(self, approx: Tensor, eps: Tensor) -> Tensor:
        """A lower bound on ``d^2`` (for ``approx < 0`` a value below 0: such rows are always candidates)."""
        return (1 - self.rho) * approx - eps

    def upper_from_lower(self, lower: Tensor, eps: Tensor) -> Tensor:
        """An upper bound on ``d^2`` from :meth:`lower`'s value (``lower`` may carry the tile's roundings, which
        ``eps`` covers)."""
        approx = (lower + eps) / (1 - self.rho)
        return torch.maximum((1 + self.rho) * approx, (1 - self.rho) * approx) + eps


def _centring(centred: bool) -> tuple[float, float, float]:
    u = UNIT_FP32
    return (4.06 * u, 2.03 * u, 2.03 * u) if centred else (0.0, 0.0, 0.0)


def expansion_model(dim: int, *, centred: bool, unit_in: float = 0.0, float64: bool = False) -> ErrorModel:
    """The float32 (or float64) GEMM expansion with a per-row bias and a rank-1 lowering of the tile."""
    if float64:
        g = _gamma(dim + 8, UNIT_FP64)
        return ErrorModel(0.0, SAFETY * 2 * g, SAFETY * g, SAFETY * 2 * g, 2.0**-1000)
    g = _gamma(dim + 8, UNIT_FP32)
    cxy, cyy, cxx = _centring(centred)
    return ErrorModel(
        rho=0.0,
        c_xy=SAFETY * (2 * g + 4.01 * unit_in + cxy),
        c_yy=SAFETY * (g + cyy),
        c_xx=SAFETY * (dim * 2.0**-50 + cxx),
        tiny=2.0**-118 * dim,
    )


def faiss_model(dim: int, *, centred: bool, unit_in: float = 0.0) -> ErrorModel:
    """faiss' float32 expansion (it computes the query norms itself, see the module notes)."""
    g = _gamma(dim + 8, UNIT_FP32)
    cxy, cyy, cxx = _centring(centred)
    return ErrorModel(
        rho=0.0,
        c_xy=SAFETY * (2 * g + 4.01 * unit_in + cxy),
        c_yy=SAFETY * (g + cyy),
        c_xx=SAFETY * (g + cxx),
        tiny=2.0**-118 * dim,
    )


def screen_model(dim: int, *, centred: bool, float32_output: bool, cuda: bool) -> ErrorModel:
    """The split-bfloat16 screen: bfloat16 GEMM with float32 accumulation (see the module notes)."""
    width = screen_width(dim)
    g = _gamma(width, (4 if cuda else 1) * UNIT_FP32)
    cxy, cyy, cxx = _centring(centred)
    u = UNIT_FP32
    rho = (3 * u if float32_output else UNIT_BF16 / (1 - UNIT_BF16)) + 3 * u
    return ErrorModel(
        rho=SAFETY * rho,
        c_xy=SAFETY * (2 * (3.1 * 2.0**-16 + 1.03 * g) + cxy + 4 * u),
        c_yy=SAFETY * (g + 4 * u + cyy),
        c_xx=SAFETY * (g + 4 * u + cxx + dim * 2.0**-50),
        tiny=2.0**-116 * width,
    )

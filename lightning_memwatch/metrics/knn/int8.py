r"""The int8 screen (``backend="torch-int8"``): exact integer GEMMs and a certificate per row and per query.

Every row ``t`` (and every query) is stored as 8-bit codes ``c = clamp(round((t - mu) / s), -L, L)`` on one
scale ``s`` for the whole index (:func:`choose_scale`: about the largest ``|t - mu|`` over ``L``) and the
float32 centre ``mu``; ``L`` is 127, or 63 where the CPU's int8 GEMM is exact only for 7-bit codes
(:func:`~lightning_memwatch.metrics.knn.backends.int8_code_limit`). Its *residual* ``e = (t - mu) - s c`` has a
norm ``r`` known at build time (per query at search time). With ``D2 = ||c_x - c_t||^2``,

    ||x - t|| = ||s (c_x - c_t) + (e_x - e_t)||   lies in   [s sqrt(D2) - r_x - r_t,  s sqrt(D2) + r_x + r_t]

(the triangle inequality). ``D2 = ||c_x||^2 + ||c_t||^2 - 2 c_x . c_t`` is an *integer* and the GEMM that makes
it (``torch._int_mm``: int8 inputs, int32 accumulation) is exact, whatever the summation order, where the
CPU accumulates products in int32 (VNNI, AMX) and, for codes within +-63, with oneDNN's AVX2 kernel (it adds
pairs of products in saturating int16): :func:`~lightning_memwatch.metrics.knn.backends.int8_code_limit` checks
it on the machine:
``|c_x . c_t| <= 127^2 D`` fits int32 for ``D <= 44,000`` (:data:`INT8_MAX_DIM` keeps a margin). So the
bound has no rounding term at all: it is the quantization residual of the two vectors, per row and per query
(about ``s sqrt(D / 12)``), and it does not grow with the norms. It is looser than the float32 bound (on
uniform rows about 22 candidates per query reach the exact re-ranking, against about 2), and the GEMM it
replaces runs several times faster (:mod:`lightning_memwatch.metrics.knn`; ``docs/performance.md``).

What is computed in floating point, and its cover:

* the residual: ``fl32(fl32(t - mu) - fl32(s c))`` errs by at most ``3 u (|t_i - mu_i| + s |c_i|)`` per
  coordinate (``u = 2**-24``; ``2**-150`` absolute per operation among subnormals); it is scaled by ``fl32(1 /
  s)`` (two more roundings) and its squares summed in float32 (``gamma_D`` relative; a square below
  ``2**-150``, lost to underflow, is a coordinate below ``2**-75`` steps), so ``r = (1 + 2 (D + 8) u)
  (s ||e_computed / s|| + 8 u s ||c||) + s sqrt(D) 2**-75 + 2**-120 D`` bounds the true residual norm
  (``||t - mu|| <= s ||c|| + ||e||``; ``||c||^2`` is an exact integer, summed in float64);
* ``s sqrt(D2)``, the sums and squares of the bounds: float64, a few roundings of ``2**-53`` relative to
  ``s sqrt(D2) + r_x + r_t``: the lower bound is ``((1 - 2**-40) s sqrt(D2) - (1 + 2**-40) (r_x + r_t))^2``
  (0 when negative) times ``1 - 2**-40``, the upper bound ``(1 + 2**-40)^2 (s sqrt(D2) + r_x + r_t)^2``.

The scan follows :mod:`.scan`'s running threshold ``T`` (the ``k``-th smallest upper bound seen): a row is a
candidate when ``s sqrt(D2) - r_x - r_t <= sqrt(T)``. The tile test is an integer comparison per query,
``||c_t||^2 - 2 c_x . c_t <= Theta``, with ``Theta`` taken with the largest residual ``r_hi`` of all but the
widest rows, rounded up: a superset of the candidates. The few rows whose residual exceeds ``r_hi`` (at most
:data:`WIDE_ROWS`: rows with values far outside the others) are tested on their own. A query that keeps more
than its top list of ``k +`` :data:`INT8_SLACK` rows passing is tested on the whole row of the tile; one with
more than :data:`INT8_DENSE` rows of a block passing (a query far outside the training values, whose residual
is large, or rows closer together than the code step) is scored again on that block with the float32 tile,
whose bound is tighter; the block is in memory, so this is no second scan of the training set
(:attr:`~lightning_memwatch.metrics.knn.SearchStats.rescanned_blocks` counts it).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.build import ThreadScratch
from lightning_memwatch.metrics.knn.scan import Candidates, FastPasses, smallest_k

__all__ = ["INT8_MAX_DIM", "Int8Builder", "Int8Rows", "int8_bounds", "int8_scan", "quantize"]

# Longest row the int8 screen takes: |2 c_x . c_t| + ||c_t||^2 <= 3 * 127^2 * D must fit int32.
INT8_MAX_DIM = 32_768
# Rows of a tile's top list per query (offered to the threshold); a query with more rows passing the integer
# test is tested on the whole row of the tile.
INT8_SLACK = 8
# A query with more rows of one block passing the integer test is scored on that block with the float32 tile.
INT8_DENSE = 256
# Bytes of float32 rows quantized at once (the temporaries stay in cache).
QUANTIZE_BYTES = 2**19
# Share of the sampled rows whose largest value sets the code step (the rest clamp).
SCALE_QUANTILE = 0.99
# Rows with the largest residuals tested one by one instead of widening every query's integer threshold.
WIDE_ROWS = 64
_UNIT = 2.0**-24
_MARGIN = 2.0**-40
INT32_MAX = 2**31 - 1


@dataclass
class Int8Rows:
    """The training rows as int8 codes, with what the certificate needs.

    Attributes:
        scale: ``s``, the value of one code step.
        limit: ``L``, the largest code magnitude.
        centre: float32 ``mu``, ``(D,)``.
        codes: int8 codes of held rows ``(n, D)``, or None (streamed rows: made block by block).
        code_sq: ``||c_t||^2`` per row, int32.
        residual: float64 ``r_t`` per row.
        r_hi: the residual every non-wide row stays within.
        wide: bool mask of the rows tested one by one (residual above ``r_hi``).
        masked: bool mask of the rows the integer tile leaves out: the wide rows and dropped duplicates.
    """

    scale: float
    limit: int
    centre: Tensor
    codes: Tensor | None
    code_sq: Tensor
    residual: Tensor
    r_hi: float
    wide: Tensor
    masked: Tensor

    def block(self, rows: Tensor, start: int) -> Tensor:
        """The codes of the block of float32 rows starting at ``start`` (held: a view)."""
        if self.codes is not None:
            return self.codes[start : start + len(rows)]
        return quantize(rows, self.centre, self.scale, self.limit)[0]


def code_width(dim: int) -> int:
    """Columns of the codes: ``D`` padded with zero codes to a multiple of 8 (torch's int8 GEMM on CPU returns
    wrong sums for an inner dimension of 1; zero columns change no sum)."""
    return -(-dim // 8) * 8


def quantize(
    rows: Tensor, centre: Tensor, scale: float, limit: int = 127, out: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """int8 codes within ``+-limit`` ``(len, code_width(D))``, int32 ``||c||^2`` and float64 residual bounds
    ``r`` of float32 CPU ``rows`` (see the notes). numpy, one thread (torch's threaded elementwise kernels cost
    more than the work when the cores are shared), in chunks of :data:`QUANTIZE_BYTES` whose two float32 buffers
    are reused per thread (:class:`~lightning_memwatch.metrics.knn.build.ThreadScratch`). ``out``: CPU tensors
    to write the three into."""
    x = rows.detach().contiguous().numpy()
    dim = x.shape[1]
    if out is None:
        out = (
            torch.zeros(len(x), code_width(dim), dtype=torch.int8),
            torch.empty(len(x), dtype=torch.int32),
            torch.empty(len(x), dtype=torch.float64),
        )
    codes, code_sq, r = (t.numpy() for t in out)
    step = max(1, QUANTIZE_BYTES // (4 * max(dim, 1)))
    chunk = min(step, len(x))
    shifted, codes32 = _SCRATCH.get("shifted", chunk, dim, np.float32), _SCRATCH.get("codes", chunk, dim, np.float32)
    for i in range(0, len(x), step):
        part = slice(i, i + step)
        n = len(x[part])
        _quantize_chunk(
            x[part], centre.numpy(), scale, limit, codes[part], code_sq[part], r[part], shifted[:n], codes32[:n]
        )
    return out


_SCRATCH = ThreadScratch()  # the quantizer's two float32 chunk buffers, per thread


def _quantize_chunk(
    x: np.ndarray,
    mu: np.ndarray,
    scale: float,
    limit: int,
    codes: np.ndarray,
    code_sq: np.ndarray,
    r: np.ndarray,
    shifted: np.ndarray,
    codes32: np.ndarray,
) -> None:
    """:func:`quantize` of one chunk of rows, into ``codes``, ``code_sq`` and ``r`` (``shifted``, ``codes32``:
    float32 scratch of the chunk's shape)."""
    dim = x.shape[1]
    inv = np.float32(1 / scale)
    np.subtract(x, mu, out=shifted)
    np.multiply(shifted, inv, out=codes32)
    np.rint(codes32, out=codes32)
    np.clip(codes32, -limit, limit, out=codes32)
    codes[:, :dim] = codes32
    if codes.shape[1] > dim:
        codes[:, dim:] = 0
    sq = np.zeros(len(x), dtype=np.float64)
    for j in range(0, dim, 1024):  # float32 sums of 1024 squares of integers <= 127 are exact (< 2**24)
        block = codes32[:, j : j + 1024]
        sq += np.einsum("ij,ij->i", block, block)
    code_sq[:] = sq
    codes32 *= np.float32(scale)
    shifted -= codes32  # the residual, in float32 (codes32 now holds s c)
    shifted *= inv  # in code steps (about +-1/2): its float32 squares underflow only below 2**-150
    resid = scale * np.sqrt(np.einsum("ij,ij->i", shifted, shifted).astype(np.float64))
    step = scale * np.sqrt(sq)
    # roundings (module notes): the residual's own, 3 u (|t - mu| + s |c|) per coordinate, the scaling by 1 / s
    # and the float32 sum of squares, within the first factor; squares lost to underflow, s sqrt(D) 2**-75
    r[:] = (1 + 2 * (dim + 8) * _UNIT) * (resid + 8 * _UNIT * step) + scale * math.sqrt(dim) * 2.0**-75
    r += 2.0**-120 * dim


def choose_scale(sample: Tensor, centre: Tensor, limit: int = 127) -> float:
    """The code step: the 99th percentile over the sampled rows of each row's largest ``|t - mu|``, over ``limit``
    (a few rows far outside the others clamp, and become wide rows, instead of coarsening every code); a
    float32 number (the residuals, computed in float32, and the bounds, in float64, use the same ``s``) within
    ``[2**-100, 2**100]``; 1.0 for constant rows."""
    if not sample.numel():
        return 1.0
    top = float(torch.quantile((sample - centre).abs().amax(dim=1).to(torch.float64), SCALE_QUANTILE))
    if not (top > 0 and math.isfinite(top)):
        return 1.0
    return float(torch.tensor(top / limit, dtype=torch.float32).clamp(2.0**-100, 2.0**100))


def _r_hi(residual: Tensor) -> float:
    """The residual within which all but the :data:`WIDE_ROWS` widest rows lie."""
    if len(residual) <= WIDE_ROWS:
        return float(residual.max()) if len(residual) else 0.0
    return float(torch.topk(residual, WIDE_ROWS + 1).values[-1])


class Int8Builder:
    """Makes the codes, code norms and residuals of every row, block by block, during the build's one pass over
    the rows (:func:`lightning_memwatch.metrics.knn.build.row_stats`'s ``on_block``; blocks may come from
    several threads, each writes its own rows).

    Args:
        n: rows. dim: row length. sample: sampled rows (the code step). centre: float32 ``mu``.
        keep_codes: hold the codes (else they are made block by block at every search). limit: largest code.
    """

    def __init__(self, n: int, dim: int, sample: Tensor, centre: Tensor, *, keep_codes: bool, limit: int) -> None:
        self.scale, self.limit, self.centre = choose_scale(sample, centre, limit), limit, centre
        self.codes = torch.empty(n, code_width(dim), dtype=torch.int8) if keep_codes else None
        self.code_sq = torch.empty(n, dtype=torch.int32)
        self.residual = torch.empty(n, dtype=torch.float64)

    def block(self, start: int, rows: Tensor) -> None:
        """Quantize the float32 rows starting at row ``start``."""
        part = slice(start, start + len(rows))
        if self.codes is not None:
            codes = self.codes[part]
        else:  # not kept: made again block by block at every search
            codes = torch.empty(len(rows), code_width(rows.shape[1]), dtype=torch.int8)
        quantize(rows, self.centre, self.scale, self.limit, out=(codes, self.code_sq[part], self.residual[part]))

    def finish(self, keep: Tensor | None, dropped: Tensor | None) -> Int8Rows:
        """The rows' :class:`Int8Rows`: ``keep`` the held rows kept after removing duplicates (None: all),
        ``dropped`` the streamed duplicates masked out of every pass (None: none)."""
        codes, code_sq, residual = self.codes, self.code_sq, self.residual
        if keep is not None:
            code_sq, residual = code_sq[keep], residual[keep]
            codes = codes[keep] if codes is not None else None
        live = residual if dropped is None else residual[~dropped]
        r_hi = _r_hi(live)
        wide = residual > r_hi
        if dropped is not None:
            wide &= ~dropped
        masked = wide if dropped is None else wide | dropped
        return Int8Rows(self.scale, self.limit, self.centre, codes, code_sq, residual, r_hi, wide, masked)


def lower_upper(d2_codes: Tensor, r_sum: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """float64 lower and upper bounds on the squared distance from the exact code distance ``D2``."""
    step = scale * d2_codes.to(torch.float64).clamp_min(0).sqrt()
    # margins on both terms before the difference: its rounding is relative to step + r_sum, not to itself
    lower = (step * (1 - _MARGIN) - r_sum * (1 + _MARGIN)).clamp_min(0).square() * (1 - _MARGIN)
    upper = ((step + r_sum) * (1 + _MARGIN)).square()
    return lower, upper


def code_threshold(threshold: Tensor, r_x: Tensor, r_hi: float, scale: float, x_code_sq: Tensor) -> Tensor:
    """The integer tile threshold ``Theta`` per query (int32, rounded up; see the notes)."""
    reach = (threshold.sqrt() + r_x + r_hi) / scale
    bound = torch.ceil(reach.square() * (1 + _MARGIN)) - x_code_sq.to(torch.float64)
    return bound.nan_to_num(nan=INT32_MAX - 1, posinf=INT32_MAX - 1).clamp(-(2**31), INT32_MAX - 1).to(torch.int32)


def int8_bounds(
    rows8: Int8Rows, x_codes: Tensor, x_sq: Tensor, r_x: Tensor, start: int, codes: Tensor
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds on every squared distance between coded queries and one block of coded rows."""
    gram = torch._int_mm(x_codes, codes.T).to(torch.int64)
    sq = rows8.code_sq[start : start + len(codes)].to(torch.int64)
    d2 = x_sq.to(torch.int64)[:, None] + sq[None, :] - 2 * gram
    r_sum = r_x[:, None] + rows8.residual[None, start : start + len(codes)]
    return lower_upper(d2, r_sum, rows8.scale)


def int8_scan(
    passes: FastPasses, rows8: Int8Rows, q: Tensor, x: Tensor, x_sq: Tensor, x_norm: Tensor, k: int
) -> tuple[Tensor, Tensor, int]:
    """The int8 screen's scan: candidate pairs ``(query, row)`` and the blocks scored again in float32.

    Args:
        passes: the index's fast passes (the float32 tile for queries a block's int8 test cannot narrow).
        rows8: the rows' codes. q: prepared float32 queries. x, x_sq, x_norm: the same as the float32 pass
            sees them (centred or not), with float64 squared norms and norms. k: neighbours per query.
    """
    fast, bs, scale = passes.fast, passes.block_size, rows8.scale
    x_codes, x_code_sq, r_x = quantize(q, rows8.centre, scale, rows8.limit)
    model = passes.expansion()
    cq = passes.cq(model, x_sq, x_norm, fast.y_max, True)
    coef = (model.c_xy * x_norm).to(torch.float32)
    colls = passes.collectors(x_norm, k)
    rescans = 0
    for j, rows in fast.blocks(centred=False):
        codes = rows8.block(rows, j)
        centred32: Tensor | None = None
        for b, coll in enumerate(colls):
            part = slice(b * bs, (b + 1) * bs)
            full = _int8_tile(coll, rows8, codes, j, x_codes[part], x_code_sq[part], r_x[part], k)
            if bool(full.any()):
                rescans += 1
                if centred32 is None:
                    centred32 = fast.centred(rows)
                sel = full.nonzero().flatten()
                tile = passes.float32_tile(x[part][sel], coef[part][sel], j, centred32, None)
                thr = coll.tile_threshold(cq[part], torch.float32)[sel]
                qi, ti = (tile <= thr[:, None]).nonzero(as_tuple=True)
                coll.keep(sel[qi], ti + j, tile[qi, ti].to(torch.float64) + cq[part][sel[qi]])
    q_pairs, t_pairs = passes.pairs(colls)
    return q_pairs, t_pairs, rescans


def _int8_tile(
    coll: Candidates,
    rows8: Int8Rows,
    codes: Tensor,
    start: int,
    x_codes: Tensor,
    x_code_sq: Tensor,
    r_x: Tensor,
    k: int,
) -> Tensor:
    """Offer and keep the candidates of one block of coded rows; returns the queries the integer test could not
    narrow (more than :data:`INT8_DENSE` rows of the block passed), which the caller scores in float32."""
    stop = start + len(codes)
    code_sq, r_rows = rows8.code_sq[start:stop], rows8.residual[start:stop]
    wide = rows8.wide[start:stop].nonzero().flatten()
    masked = rows8.masked[start:stop].nonzero().flatten()
    gram = torch._int_mm(x_codes, codes.T)
    tile = torch.add(code_sq, gram, alpha=-2)  # int32: ||c_t||^2 - 2 c_x . c_t (exact, no overflow)
    if len(masked):
        tile[:, masked] = INT32_MAX
    kc = min(k + INT8_SLACK, len(codes))
    vals, loc = smallest_k(tile, kc)
    narrowable = kc < len(codes) - len(masked)  # rows beyond the top list may pass
    with one_thread():
        return _bookkeeping(
            coll, rows8, code_sq, r_rows, wide, gram, tile, vals, loc, start, x_code_sq, r_x, narrowable
        )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch ops on one thread: the small ops of a tile's bookkeeping cost more in OpenMP barriers than in work,
    and far more when another process shares the cores (a thread descheduled holds up every barrier)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bookkeeping(
    coll: Candidates,
    rows8: Int8Rows,
    code_sq: Tensor,
    r_rows: Tensor,
    wide: Tensor,
    gram: Tensor,
    tile: Tensor,
    vals: Tensor,
    loc: Tensor,
    start: int,
    x_code_sq: Tensor,
    r_x: Tensor,
    narrowable: bool,
) -> Tensor:
    """The threshold, the candidates and the dense queries of one tile (see :func:`_int8_tile`)."""
    valid = vals < INT32_MAX
    lower, upper = lower_upper(vals.to(torch.int64) + x_code_sq[:, None], r_x[:, None] + r_rows[loc], rows8.scale)
    lower[~valid], upper[~valid] = torch.inf, torch.inf
    coll.offer(upper)
    if len(wide):
        wide_d2 = code_sq[wide].to(torch.int64) - 2 * gram[:, wide].to(torch.int64) + x_code_sq[:, None]
        wide_lower, wide_upper = lower_upper(wide_d2, r_x[:, None] + r_rows[wide], rows8.scale)
        coll.offer(wide_upper)
    theta = code_threshold(coll.threshold, r_x, rows8.r_hi, rows8.scale, x_code_sq)
    full = (vals.max(dim=1).values <= theta) if narrowable else torch.zeros(len(vals), dtype=torch.bool)
    thr = coll.threshold[:, None]
    qi, ci = (valid & (vals <= theta[:, None]) & (lower <= thr) & ~full[:, None]).nonzero(as_tuple=True)
    coll.keep(qi, loc[qi, ci] + start, lower[qi, ci])
    dense = torch.zeros_like(full)
    if bool(full.any()):  # more rows pass than the top list holds: test the whole row of the tile
        sel = full.nonzero().flatten()
        passing = tile[sel] <= theta[sel, None]
        dense[sel] = passing.sum(dim=1) > INT8_DENSE
        sparse = ~dense[sel]
        qi, ti = (passing & sparse[:, None]).nonzero(as_tuple=True)
        d2 = code_sq[ti].to(torch.int64) - 2 * gram[sel[qi], ti].to(torch.int64) + x_code_sq[sel[qi]]
        low, _ = lower_upper(d2, r_x[sel[qi]] + r_rows[ti], rows8.scale)
        ok = low <= coll.threshold[sel[qi]]
        coll.keep(sel[qi][ok], ti[ok] + start, low[ok])
    if len(wide):
        qi, wi = ((wide_lower <= thr) & ~dense[:, None]).nonzero(as_tuple=True)
        coll.keep(qi, wide[wi] + start, wide_lower[qi, wi])
    return dense

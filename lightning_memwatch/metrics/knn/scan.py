"""The fast passes: one scan of the training set per search, collecting candidates under a running threshold.

Each pass (float32 GEMM, faiss, split-bfloat16 screen, float64 for values float32 cannot hold) produces, per
block of queries and block of training rows, *lower bounds* on the squared distances (see :mod:`.bounds`).
A :class:`Candidates` per block of queries keeps the ``k`` smallest *upper* bounds seen so far; the ``k``-th
of them, ``T``, is at least the true ``k``-th distance, and it only falls as the scan goes on. Every row whose
lower bound is at most ``T`` when its block is scanned is kept as a candidate, and candidates whose lower bound
exceeds the final ``T`` are dropped. A row never kept had a lower bound above a value at least the true
``k``-th distance: it is strictly farther than the ``k``-th neighbour, so the exact re-ranking of the
candidates (:mod:`.exact`) is the exact answer, without a second scan.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_memwatch.metrics.knn.bounds import ErrorModel, screen_width
from lightning_memwatch.metrics.knn.rows import HeldRows

__all__ = ["Candidates", "FastRows", "float32_screen_output", "screen_queries", "screen_rows", "split3"]

# Approximate candidates taken per tile before the threshold test (more only where the threshold asks).
TILE_SLACK = 4
# Candidates kept per query beyond which the kept list is pruned against the current threshold.
_PRUNE_EVERY = 4096


@dataclass
class FastRows:
    """The training rows as the fast passes see them, with their norms.

    Attributes:
        source: the rows (held or streamed).
        device: where the passes run.
        centre: float32 centre subtracted from rows and queries, or None.
        y_norm: float64 norm of every fast row (0 for a dropped duplicate).
        y_sq: float64 squared norm of every fast row (``inf`` for a dropped duplicate).
        y_max: the largest ``y_norm``.
        dropped: streamed duplicates masked out of every pass, or None.
        block_rows: training rows per block.
    """

    source: HeldRows
    device: torch.device
    centre: Tensor | None
    y_norm: Tensor
    y_sq: Tensor
    y_max: float
    dropped: Tensor | None
    block_rows: int

    def blocks(self, centred: bool = True) -> Iterator[tuple[int, Tensor]]:
        """``(start, rows)`` over the training set; centred rows come in one reused buffer."""
        n, step = self.source.n, self.block_rows
        buffer = None
        if centred and self.centre is not None:
            buffer = torch.empty(min(step, n), self.source.dim, device=self.device)
        for j in range(0, n, step):
            rows = self.source.block(j, min(j + step, n), self.device).to(self.device)
            if buffer is not None:
                rows = torch.sub(rows, self.centre, out=buffer[: len(rows)])
            yield j, rows

    def centred(self, q: Tensor) -> Tensor:
        return q if self.centre is None else q - self.centre

    def mask_dropped(self, tile: Tensor, start: int) -> None:
        if self.dropped is not None:
            tile[:, self.dropped[start : start + tile.shape[1]].to(tile.device)] = torch.inf


class Candidates:
    """Running threshold and kept candidates of one block of queries (see the module notes).

    Args:
        k: neighbours per query.
        x_norm: float64 norms of the queries as the pass sees them, ``(b,)``.
    """

    def __init__(self, k: int, x_norm: Tensor) -> None:
        b, device = len(x_norm), x_norm.device
        self.k = k
        self.x_norm = x_norm
        self.best_upper = torch.full((b, k), torch.inf, dtype=torch.float64, device=device)
        self.threshold = torch.full((b,), torch.inf, dtype=torch.float64, device=device)
        self._q: list[Tensor] = []
        self._t: list[Tensor] = []
        self._lower: list[Tensor] = []
        self._kept = 0
        self._pruned_at = 0

    def offer(self, upper: Tensor) -> None:
        """Lower the threshold with upper bounds ``(b, c)`` of distinct rows not offered before."""
        both = torch.cat([self.best_upper, upper.nan_to_num(nan=torch.inf)], dim=1)
        self.best_upper = torch.topk(both, self.k, dim=1, largest=False, sorted=False).values
        self.threshold = self.best_upper.max(dim=1).values

    def tile_threshold(self, cq: Tensor, dtype: torch.dtype) -> Tensor:
        """``T - cq`` in the tile's dtype, rounded up (so that the test never drops a candidate)."""
        thr = self.threshold - cq
        if dtype == torch.float64:
            return thr
        thr32 = thr.to(dtype)
        return torch.nextafter(thr32, torch.full_like(thr32, torch.inf))

    def add_tile(self, tile: Tensor, start: int, y_norm: Tensor, cq: Tensor, model: ErrorModel, y_max: float) -> None:
        """Take the candidates of one tile of lower bounds minus ``cq``, ``(b, rows)``; ``y_norm`` of its rows."""
        b, rows = tile.shape
        kc = min(self.k + TILE_SLACK, rows)
        vals, loc = torch.topk(tile, kc, dim=1, largest=False, sorted=False)
        lower = vals.to(torch.float64) + cq[:, None]
        eps = model.eps(self.x_norm[:, None], y_norm[loc], y_max)
        self.offer(model.upper_from_lower(lower, eps))
        thr = self.tile_threshold(cq, tile.dtype)
        full = (vals.max(dim=1).values <= thr) if kc < rows else torch.zeros(b, dtype=torch.bool, device=tile.device)
        qi, ci = ((vals <= thr[:, None]) & ~full[:, None]).nonzero(as_tuple=True)
        self.keep(qi, loc[qi, ci] + start, lower[qi, ci])
        if bool(full.any()):
            sel = full.nonzero().flatten()
            sub = tile[sel]
            qi, ti = (sub <= thr[sel, None]).nonzero(as_tuple=True)
            self.keep(sel[qi], ti + start, sub[qi, ti].to(torch.float64) + cq[sel[qi]])

    def keep(self, q: Tensor, t: Tensor, lower: Tensor) -> None:
        """Keep pairs (query of this block, row, lower bound of the squared distance)."""
        if len(q) == 0:
            return
        self._q.append(q)
        self._t.append(t)
        self._lower.append(lower)
        self._kept += len(q)
        if self._kept > 2 * self._pruned_at + _PRUNE_EVERY:
            self._prune()

    def _prune(self) -> None:
        q, t, lower = torch.cat(self._q), torch.cat(self._t), torch.cat(self._lower)
        keep = ~(lower > self.threshold[q])  # NaN kept (never happens on the guarded passes)
        self._q, self._t, self._lower = [q[keep]], [t[keep]], [lower[keep]]
        self._kept = self._pruned_at = int(keep.sum())

    def result(self) -> tuple[Tensor, Tensor]:
        """The candidate pairs ``(query of this block, row)`` under the final threshold."""
        device = self.threshold.device
        if not self._q:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        self._prune()
        return self._q[0], self._t[0]


# ------------------------------------------------------------------------------ split-bfloat16 screen
def split3(v: Tensor) -> Tensor:
    """float64 ``v`` as three bfloat16 parts whose sum is ``v`` to about 2**-24 relative, ``(len, 3)``."""
    a = v.to(torch.bfloat16)
    r = v - a.to(torch.float64)
    b = r.to(torch.bfloat16)
    r = r - b.to(torch.float64)
    return torch.stack([a, b, r.to(torch.bfloat16)], dim=1)


def screen_rows(rows: Tensor, y_sq: Tensor) -> Tensor:
    """Screening rows ``[hi, lo, hi, -||t||^2/2 in 3 parts, 1, 1, 1, 0...]`` in bfloat16 (rows already centred)."""
    d = rows.shape[1]
    out = torch.zeros(len(rows), screen_width(d), dtype=torch.bfloat16, device=rows.device)
    hi = rows.to(torch.bfloat16)
    out[:, :d] = hi
    out[:, d : 2 * d] = (rows - hi.to(torch.float32)).to(torch.bfloat16)
    out[:, 2 * d : 3 * d] = hi
    out[:, 3 * d : 3 * d + 3] = split3(-torch.where(torch.isfinite(y_sq), y_sq, 0.0) / 2)
    out[:, 3 * d + 3 : 3 * d + 6] = 1
    return out


def screen_queries(x: Tensor, x_sq: Tensor) -> Tensor:
    """Screening queries ``[hi, hi, lo, 1, 1, 1, -||x||^2/2 in 3 parts, 0...]`` in bfloat16."""
    d = x.shape[1]
    out = torch.zeros(len(x), screen_width(d), dtype=torch.bfloat16, device=x.device)
    hi = x.to(torch.bfloat16)
    out[:, :d] = hi
    out[:, d : 2 * d] = hi
    out[:, 2 * d : 3 * d] = (x - hi.to(torch.float32)).to(torch.bfloat16)
    out[:, 3 * d : 3 * d + 3] = 1
    out[:, 3 * d + 3 : 3 * d + 6] = split3(-x_sq / 2)
    return out


@functools.lru_cache(maxsize=8)
def float32_screen_output(device: torch.device) -> bool:
    """Whether the screen's GEMM returns its float32 accumulator: CUDA with ``torch.mm(..., out_dtype=...)``
    (torch 2.9 and later); elsewhere the result is rounded to bfloat16 (the bound's ``rho``, see
    :mod:`.bounds`)."""
    if device.type != "cuda":
        return False
    try:
        one = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32  # type: ignore[call-arg]
    except (TypeError, RuntimeError):  # pragma: no cover - older torch
        return False


def screen_mm(qs: Tensor, rows: Tensor, float32_output: bool) -> Tensor:
    """``qs @ rows.T``: bfloat16 inputs, float32 accumulation; the float32 accumulator where asked for.

    On CPU the float32 accumulator comes from a float32 GEMM of the bfloat16 values (products of bfloat16
    numbers are exact in float32): the same arithmetic the CUDA path assumes, which the property tests use.
    """
    if float32_output and qs.device.type != "cuda":
        return torch.mm(qs.to(torch.float32), rows.to(torch.float32).T)
    if float32_output:
        return torch.mm(qs, rows.T, out_dtype=torch.float32)  # type: ignore[call-arg]
    return torch.mm(qs, rows.T)


@contextlib.contextmanager
def float32_accumulation(device: torch.device) -> Iterator[None]:
    """On CUDA, forbid cuBLAS' reduced-precision (bfloat16) reductions, which the screen's bound excludes."""
    if device.type != "cuda":
        yield
        return
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def faiss_block(
    faiss: Any, q: Tensor, rows: Tensor, norms: Tensor, c: int, gpu_res: Any = None
) -> tuple[Tensor, Tensor]:
    """faiss' ``c`` smallest approximate squared distances (float32) and local rows of one block of rows."""
    if gpu_res is not None:  # pragma: no cover - needs a GPU build of faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss.knn_gpu take torch tensors)

        device = q.device.index if q.device.index is not None else torch.cuda.current_device()
        return faiss.knn_gpu(gpu_res, q.contiguous(), rows.contiguous(), c, device=device)
    q_np, rows = q.contiguous().numpy(), rows.contiguous()
    dist = torch.empty(len(q), c, dtype=torch.float32)
    cand = torch.empty(len(q), c, dtype=torch.int64)
    faiss.knn_L2sqr(
        faiss.swig_ptr(q_np),
        faiss.swig_ptr(rows.numpy()),
        rows.shape[1],
        len(q),
        len(rows),
        c,
        faiss.swig_ptr(dist.numpy()),
        faiss.swig_ptr(cand.numpy()),
        faiss.swig_ptr(norms.contiguous().numpy()),
    )
    return dist, cand

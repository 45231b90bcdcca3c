"""The index build's one pass: row hashes, float64 norms (centred or not) and the centring decision."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, build
from lightning_memwatch.metrics.knn.rows import HeldRows


@pytest.mark.parametrize("dim", [7, 64])
@pytest.mark.parametrize("centred", [False, True])
def test_row_stats_norms_match_float64_over_many_blocks_and_threads(monkeypatch, dim: int, centred: bool) -> None:
    # Blocks of a few rows, two threads, a shorter last block: each thread's scratch is reused from block to
    # block and must never leak one block's values into the next.
    monkeypatch.setattr(build, "BUILD_BLOCK_BYTES", 4 * dim * 5)
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(203, dim, generator=g) * 3 + 10
    centre = build.centre_of(rows[::7]) if centred else None
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stats = build.row_stats(HeldRows(rows), torch.device("cpu"), hashes=True, centre=centre)
    finally:
        torch.set_num_threads(threads)
    shifted = rows if centre is None else rows - centre  # float32 difference, as the fast passes see it
    want = shifted.to(torch.float64).square().sum(dim=1)
    torch.testing.assert_close(stats.sq_norms, want, rtol=1e-13, atol=0)
    assert stats.hashes is not None
    assert torch.equal(stats.hashes, torch.from_numpy(build.hash_block(rows.numpy())))


@pytest.mark.parametrize("dim", [1, 5, 6])
def test_row_hash_is_the_wrapped_sum_of_word_products_and_ignores_the_sign_of_zero(dim: int) -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((40, dim)).astype(np.float32)
    rows[0] = 0.0
    rows[1] = -0.0
    words = rows.view(np.uint64 if dim % 2 == 0 else np.uint32)
    coefficients = build._hash_coefficients(words.shape[1], 64 if dim % 2 == 0 else 32)
    want = (words * coefficients).sum(axis=1, dtype=words.dtype).astype(np.uint64).view(np.int64)
    got = build.hash_block(rows)
    assert np.array_equal(got[2:], want[2:])
    assert got[0] == got[1]
    assert len(np.unique(got[1:])) == len(rows) - 1


def test_centring_is_decided_from_the_sample() -> None:
    g = torch.Generator().manual_seed(2)
    spread = torch.randn(500, 16, generator=g)
    assert build.centring_pays(spread + 5.0, build.centre_of(spread + 5.0))
    assert not build.centring_pays(spread, build.centre_of(spread))
    offset = NearestNeighbourIndex(spread + 5.0, backend="torch")
    plain = NearestNeighbourIndex(spread, backend="torch")
    assert offset._mean is not None and plain._mean is None
    # the index's norms are those of the rows the fast passes see
    want = (spread + 5.0 - offset._mean).to(torch.float64).square().sum(dim=1)
    torch.testing.assert_close(offset._fast.y_sq, want, rtol=1e-13, atol=0)


def test_the_float32_tile_uses_onednn_only_under_ieee_float32_matmuls() -> None:
    from lightning_memwatch.metrics.knn import backends

    cpu = torch.device("cpu")
    assert backends.float32_tile_kernel(torch.device("meta")) == "blas"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bfloat16 inputs allowed: addmm, whose bound models them
        assert backends.float32_tile_kernel(cpu) == "blas"
    finally:
        torch.set_float32_matmul_precision(before)
    want = "onednn" if backends.onednn_float32_tile() else "blas"
    assert backends.float32_tile_kernel(cpu) == want
    with torch.backends.mkldnn.flags(enabled=False):  # the user turned torch's oneDNN off
        assert backends.float32_tile_kernel(cpu) == "blas"
    if torch.backends.mkldnn.is_available():
        assert backends._onednn_close_to_float64()  # IEEE float32 sums, within the dot-product bound
        g = torch.Generator().manual_seed(0)
        x, rows, bias = torch.randn(5, 40, generator=g), torch.randn(7, 40, generator=g), torch.randn(7, generator=g)
        torch.testing.assert_close(backends.onednn_gemm(x, rows, bias), bias + x @ rows.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32])
@pytest.mark.parametrize("width", [4096, 4000, 320])
def test_smallest_k_by_groups_gives_topks_values(dtype: torch.dtype, width: int) -> None:
    from lightning_memwatch.metrics.knn.scan import smallest_k

    g = torch.Generator().manual_seed(7)
    tile = torch.randint(-50, 50, (37, width), generator=g).to(dtype)  # many ties
    tile[3] = 5  # a row of one value
    tile[4, ::2] = -100  # ties at the minimum in every group
    if dtype == torch.float32:
        tile[5, 100] = torch.inf
        tile[6, 7] = torch.nan  # a NaN: topk over the row, which orders it last
    for kc in (1, 6, 10):
        vals, loc = smallest_k(tile, kc)
        want = torch.topk(tile, kc, dim=1, largest=False, sorted=False).values
        assert torch.equal(vals.sort(dim=1).values, want.sort(dim=1).values)
        assert torch.equal(tile.gather(1, loc), vals)
        assert all(len(set(row.tolist())) == kc for row in loc)  # distinct columns

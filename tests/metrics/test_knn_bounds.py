"""Property tests of the one-scan search: its bounds bracket every distance, and its answer is float64's.

Adversarial sets, every backend available here (torch float32 with each of its tile GEMMs, oneDNN's and
addmm's; torch-bf16 forced on this CPU; torch-int8; faiss-cpu):
near-tie-dense saturated low-rank images (half of the pixels exactly 1.0), near ties, duplicates, a large
offset, rows of 1e20, subnormal rows, norms spread over six decades. Hypothesis draws more.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends, scan
from lightning_memwatch.metrics.knn.backends import int8_code_limit

torch.set_num_threads(1)

# the float32 pass with each GEMM its tiles may run on (oneDNN where present and faster, else addmm): forced
KERNELS = ["blas", "onednn"] if torch.backends.mkldnn.is_available() else ["blas"]
BACKENDS = [f"torch:{k}" for k in KERNELS] + [b for b in available_backends("cpu") if b not in ("faiss-gpu", "torch")]


def make_index(monkeypatch: pytest.MonkeyPatch, backend: str, train: torch.Tensor, **kwargs) -> NearestNeighbourIndex:
    """The index of ``backend``; ``torch:<kernel>`` forces the float32 tile's GEMM (while ``monkeypatch`` lasts)."""
    name, _, kernel = backend.partition(":")
    if kernel:
        monkeypatch.setattr(scan, "float32_tile_kernel", lambda device: kernel)
    return NearestNeighbourIndex(train, backend=name, **kwargs)


def saturated_lowrank(rows: int, dim: int, g: torch.Generator, basis: torch.Tensor) -> torch.Tensor:
    """Low-rank image-like rows with about half of the pixels clipped at exactly 1.0 (near-tie-dense)."""
    low = torch.randn(rows, basis.shape[0], generator=g) @ basis
    return (1.0 + low + 0.01 * torch.randn(rows, dim, generator=g)).clamp(0, 1)


def datasets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(24)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    basis = torch.randn(8, 144, generator=g) / 3
    train = saturated_lowrank(600, 144, g, basis)
    queries = saturated_lowrank(60, 144, g, basis)
    queries[:6] = train[:6]
    queries[6:18] = (train[6:18] + 1e-4 * torch.randn(12, 144, generator=g)).clamp(0, 1)
    out["saturated"] = (train, queries)
    # near ties: rows at distance 1 from the origin, 1e-7 apart, plus far rows that inflate norm-based bounds
    ring = torch.eye(32)[:, :32] * (1 + 1e-7 * torch.arange(32.0))[:, None]
    train = torch.cat([ring, -ring, 300.0 * torch.eye(32)[:4], torch.randn(100, 32, generator=g)])
    queries = torch.cat([torch.zeros(3, 32), 1e-4 * torch.randn(5, 32, generator=g), train[-5:]])
    out["near_ties"] = (train, queries)
    # duplicates and an offset of 1000
    base = 1000.0 + torch.rand(200, 24, generator=g) * 1e-2
    train = torch.cat([base, base[:20], base[5:6].repeat(3, 1)])
    queries = torch.cat([base[:10], base[20:30] + 1e-6, 1000.0 + torch.rand(10, 24, generator=g) * 1e-2])
    out["offset_duplicates"] = (train, queries)
    # norms over six decades: the per-row bound must hold for the short rows next to long ones
    scales = 10.0 ** torch.randint(-3, 4, (400, 1), generator=g).float()
    train = torch.randn(400, 16, generator=g) * scales
    queries = torch.cat([train[:10] * (1 + 1e-6), torch.randn(20, 16, generator=g) * 1e-3, train[10:20]])
    out["mixed_scales"] = (train, queries)
    # subnormal values (below 2**-126) next to normal ones
    train = torch.cat([torch.randn(100, 16, generator=g) * 1e-39, torch.randn(50, 16, generator=g) * 1e-20])
    queries = torch.cat([train[:5], torch.randn(10, 16, generator=g) * 1e-39, train[100:105] * 1.5])
    out["subnormal"] = (train, queries)
    return out


DATA = datasets()
FINITE = ["saturated", "near_ties", "offset_duplicates", "mixed_scales", "subnormal"]


def brute_force_sq(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    q, t = queries.reshape(len(queries), -1).double(), train.reshape(len(train), -1).double()
    return ((q[:, None, :] - t[None, :, :]) ** 2).sum(dim=2)


def assert_exact(index: NearestNeighbourIndex, queries: torch.Tensor, train: torch.Tensor, k: int) -> None:
    """The index's k nearest are float64's: distances equal to float64 rounding, indices a valid top-k with
    exact ties to the lower row (indices equal wherever the float64 gaps exceed summation-order noise)."""
    d2, idx = index.search_squared(index.prepare_queries(queries), k)
    d2, idx = d2.cpu(), idx.cpu()
    keep = torch.ones(len(train), dtype=torch.bool)
    if index.num_duplicates:
        flat = train.reshape(len(train), -1)
        for r in range(len(train)):
            keep[r] = not any(torch.equal(flat[r], flat[s]) for s in range(r))
    full = brute_force_sq(queries, train)
    full[:, ~keep] = torch.inf
    want_d2, want_i = full.sort(dim=1, stable=True)
    scale = want_d2[:, :k].abs() + 1e-300
    assert bool(((d2 - want_d2[:, :k]).abs() <= 1e-12 * scale).all())
    got = torch.gather(full, 1, idx)  # the float64 distances of the rows returned
    assert bool(((got - d2).abs() <= 1e-12 * scale).all())
    padded = torch.cat([torch.full((len(full), 1), -torch.inf), want_d2, torch.full((len(full), 1), torch.inf)], 1)
    gaps = padded[:, 1:] - padded[:, :-1]  # gaps[:, j]: between places j - 1 and j
    ok = (gaps > 1e-12 * padded[:, 1:].abs().clamp_max(1e300)) | (gaps == 0)
    clear = ok[:, :k] & ok[:, 1 : k + 1]
    assert torch.equal(idx[clear], want_i[:, :k][clear])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", FINITE)
def test_bounds_bracket_every_distance(monkeypatch, backend: str, name: str) -> None:
    train, queries = DATA[name]
    index = make_index(monkeypatch, backend, train, dedupe=False, database_block_size=128)
    lower, upper = index._all_bounds(index.prepare_queries(queries))
    true = brute_force_sq(queries, train)
    assert bool((lower <= true).all()) and bool((true <= upper).all())
    if name == "saturated":  # not vacuous: within a few percent of the distances between distinct images
        far = true > 1.0
        # bfloat16 rounding, int8 code residuals (twice as wide with 7-bit codes: AVX2 without VNNI)
        width = {"torch-bf16": 0.05, "torch-int8": 0.05 if int8_code_limit() == 127 else 0.1}.get(backend, 1e-3)
        assert float(((upper - lower)[far] / true[far]).median()) < width


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", [*FINITE, "huge"])
@pytest.mark.parametrize("dedupe", [True, False])
def test_search_equals_float64_brute_force(monkeypatch, backend: str, name: str, dedupe: bool) -> None:
    if name == "huge":  # rows of 1e20 next to ordinary ones: float32 cannot hold their squares
        g = torch.Generator().manual_seed(3)
        train = torch.cat([torch.rand(50, 8, generator=g), 1e20 * (1 + torch.rand(5, 8, generator=g))])
        queries = torch.cat([train[[0, 52]], torch.rand(4, 8, generator=g), 1e20 * torch.ones(1, 8)])
    else:
        train, queries = DATA[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicates
        index = make_index(monkeypatch, backend, train, dedupe=dedupe, database_block_size=96, block_size=16)
    for k in (1, 2, 5):
        assert_exact(index, queries, train, k)
        stats = index.last_search
        assert stats is not None and stats.queries == len(queries)
        assert stats.scans == 1 and stats.candidates >= k * len(queries)
        assert stats.float64_queries == (len(queries) if name == "huge" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_scan_per_search_on_near_tie_dense_images(monkeypatch, backend: str) -> None:
    # Saturated low-rank images leave many rows within the bound of the k-th neighbour: more candidates, one scan.
    g = torch.Generator().manual_seed(5)
    basis = torch.randn(16, 256, generator=g) / 4
    train = saturated_lowrank(3000, 256, g, basis)
    queries = saturated_lowrank(200, 256, g, basis)
    queries[:20] = train[:20]
    assert float((train == 1.0).float().mean()) > 0.4
    index = make_index(monkeypatch, backend, train, database_block_size=512, block_size=64)
    d2, idx = index.search_squared(index.prepare_queries(queries), 2)
    stats = index.last_search
    assert stats is not None
    assert stats.scans == 1 and stats.float64_queries == 0 and stats.rescanned_blocks >= 0
    assert stats.candidates < 20 * 2 * len(queries)  # a handful per query, not the training set
    want = brute_force_sq(queries, train).sort(dim=1, stable=True)
    assert torch.equal(idx, want.indices[:, :2])
    assert set(stats.seconds) == {"scan", "rerank"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 40),
    n=st.integers(2, 120),
    offset=st.sampled_from([0.0, 1.0, 1e3, -1e6]),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e8]),
    copies=st.integers(0, 5),
)
def test_hypothesis_random_sets_are_exact(
    seed: int, dim: int, n: int, offset: float, scale: float, copies: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    train = offset + scale * torch.randn(n, dim, generator=g)
    train[: n // 4] = train[: n // 4].round()  # some rows on a lattice: exact ties
    queries = torch.cat(
        [train[torch.randint(0, n, (copies,), generator=g)], offset + scale * torch.randn(6, dim, generator=g)]
    )
    queries[-1] = train[0] * 0.5 + train[-1] * 0.5  # a midpoint
    k = min(3, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in BACKENDS:
            with pytest.MonkeyPatch.context() as monkeypatch:
                try:
                    index = make_index(monkeypatch, backend, train, dedupe=False, database_block_size=32)
                except ValueError:
                    return  # fewer than 2 distinct rows
                assert_exact(index, queries, train, k)
                assert index.last_search is not None and index.last_search.scans == 1


@pytest.mark.parametrize("name", ["saturated", "near_ties", "mixed_scales", "subnormal"])
def test_screen_with_float32_accumulator_output_as_on_cuda(name: str) -> None:
    # The CUDA screen reads the GEMM's float32 accumulator (no bfloat16 rounding of the result, rho ~ 0): the
    # same arithmetic emulated on CPU (a float32 GEMM of the bfloat16 values) must keep the bounds and the answer.
    train, queries = DATA[name]
    index = NearestNeighbourIndex(train, backend="torch-bf16", dedupe=False, database_block_size=128)
    index._passes.screen_float32_output = True
    lower, upper = index._all_bounds(index.prepare_queries(queries))
    true = brute_force_sq(queries, train)
    assert bool((lower <= true).all()) and bool((true <= upper).all())
    for k in (1, 2, 5):
        assert_exact(index, queries, train, k)
    stats = index.last_search
    assert stats is not None and stats.scans == 1
    rounded = NearestNeighbourIndex(train, backend="torch-bf16", dedupe=False, database_block_size=128)
    rounded.search(queries, 5)
    assert rounded.last_search is not None and stats.candidates <= rounded.last_search.candidates

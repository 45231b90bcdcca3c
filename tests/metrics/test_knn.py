"""NearestNeighbourIndex: exactness against float64 brute force, blocking, invariances, bad inputs."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from _child_env import child_env

from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends
from lightning_memwatch.metrics.knn import backends as knn_backends
from lightning_memwatch.metrics.knn import exact as knn_exact

torch.set_num_threads(1)

CPU_BACKENDS = available_backends("cpu")
CUDA = torch.cuda.is_available()
ALL_BACKENDS = [(b, "cpu") for b in CPU_BACKENDS] + (
    [(b, "cuda") for b in available_backends("cuda") if b != "faiss-cpu"] if CUDA else []
)


def brute_force(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 brute force on flattened rows: (distances, indices), ascending, ties by lower index."""
    q = queries.reshape(len(queries), -1).double().cpu()
    t = train.reshape(len(train), -1).double().cpu()
    d = ((q[:, None, :] - t[None, :, :]) ** 2).sum(dim=2).sqrt()
    values, order = d.sort(dim=1, stable=True)
    return values[:, :k], order[:, :k]


def ratios_of(distances: torch.Tensor) -> torch.Tensor:
    return distances[:, 0].double() / distances[:, 1].double()


def dyadic(*shape: int, levels: int = 4096, seed: int = 0) -> torch.Tensor:
    """Random multiples of 1/levels in [-1, 1): exact in float32, also after shifting by a power of two."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels, shape, generator=g).float() / levels


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    train = torch.randn(400, 3, 4, 4, generator=g)
    queries = torch.randn(150, 3, 4, 4, generator=g)
    queries[:20] = train[100:120]  # exact copies
    queries[20:40] = train[200:220] + 1e-4 * torch.randn(20, 3, 4, 4, generator=g)  # near copies
    return train, queries


@pytest.mark.parametrize("backend,device", ALL_BACKENDS)
def test_every_backend_matches_float64_brute_force(data, backend: str, device: str) -> None:
    train, queries = data
    index = NearestNeighbourIndex(train.to(device), backend=backend, block_size=64, database_block_size=128)
    assert index.backend == backend
    distances, indices = index.search(queries.to(device), k=3)
    want_d, want_i = brute_force(queries, train, 3)
    assert distances.dtype == torch.float32 and indices.dtype == torch.int64
    assert torch.equal(indices.cpu(), want_i)
    torch.testing.assert_close(distances.cpu().double(), want_d, rtol=1e-6, atol=1e-6)
    assert (ratios_of(distances.cpu()) - want_d[:, 0] / want_d[:, 1]).abs().max() < 1e-5
    assert torch.equal(distances[:20, 0].cpu(), torch.zeros(20))  # exact copies: distance exactly 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_near_duplicates_with_large_offset_stay_exact(backend: str) -> None:
    # Clusters of rows 1e-3 apart on top of an offset of 50: the float32 expansion ||q||^2 - 2 q.t + ||t||^2
    # alone cannot order them; the exact re-ranking (and fallback) must.
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(40, 32, generator=g)
    train = (centres.repeat_interleave(5, dim=0) + 1e-3 * torch.randn(200, 32, generator=g)) + 50.0
    queries = train[::7] + 2e-4 * torch.randn(len(train[::7]), 32, generator=g)
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=64)
    distances, indices = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(indices, want_i)
    assert (ratios_of(distances) - want_d[:, 0] / want_d[:, 1]).abs().max() < 1e-5


def test_near_ties_become_candidates_of_the_one_scan() -> None:
    # Query at the origin; many neighbours at distance ~2 differing by 1e-7 relative, plus far rows: the
    # approximate pass cannot order the near ties, so they all become candidates, in the same scan.
    dim = 24
    near = torch.zeros(12, dim)
    for i in range(12):
        near[i, i] = 2.0 * (1.0 + (11 - i) * 2e-7)
    far = torch.zeros(2, dim)
    far[0, -1], far[1, -1] = 3000.0, -3000.0
    train = torch.cat([far, near])
    queries = torch.zeros(3, dim)
    queries[1, 5], queries[2, 7] = 1e-3, -1e-3
    for backend in CPU_BACKENDS:
        index = NearestNeighbourIndex(train, backend=backend)
        distances, indices = index.search(queries, k=2)
        want_d, want_i = brute_force(queries, train, 2)
        stats = index.last_search
        assert stats is not None and stats.scans == 1, backend
        assert stats.candidates > 3 * 2 and stats.certified_at_once < 3, backend  # the near ties: candidates
        assert torch.equal(indices, want_i), backend
        torch.testing.assert_close(distances.double(), want_d, rtol=1e-7, atol=0)


def test_torch_reranking_path_matches_numpy(data, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU code path of the exact re-ranking, exercised on CPU.
    train, queries = data
    want = NearestNeighbourIndex(train, backend="torch").search(queries)
    monkeypatch.setattr(knn_exact, "NUMPY_ON_CPU", False)
    got = NearestNeighbourIndex(train, backend="torch").search(queries)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-7, atol=0)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_widens_the_bound_and_stays_exact(data, precision: str) -> None:
    # TF32/bfloat16 matmuls may be enabled by the user (Lightning suggests it): the bound grows, more rows become
    # candidates, and results stay exact.
    train, queries = data
    index = NearestNeighbourIndex(train * 30.0, backend="torch")
    index.search(queries * 30.0)
    assert index.last_search is not None
    ieee = index.last_search.candidates
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        distances, indices = index.search(queries * 30.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    want_d, want_i = brute_force(queries * 30.0, train * 30.0, 2)
    assert index.last_search.candidates > ieee and index.last_search.scans == 1
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(distances.double(), want_d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_ties_go_to_the_lower_row(backend: str) -> None:
    # 2 x 16 rows at exactly distance 1 from the origin, shuffled, plus far rows: every query at the origin has
    # 32 tied neighbours, all candidates of the one scan; the lowest row numbers win.
    dim = 16
    ring = torch.cat([torch.eye(dim), -torch.eye(dim)])
    train = torch.cat([ring[torch.randperm(2 * dim, generator=torch.Generator().manual_seed(9))], 500 * ring[:2]])
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=5)
    distances, indices = index.search(torch.zeros(2, dim), k=3)
    assert distances.tolist() == [[1.0, 1.0, 1.0]] * 2
    assert indices.tolist() == [[0, 1, 2]] * 2
    assert index.last_search is not None and index.last_search.scans == 1
    assert index.last_search.candidates == 2 * 2 * dim  # every tied row of both queries


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_blocked_equals_one_shot(data, backend: str) -> None:
    train, queries = data
    one_shot = NearestNeighbourIndex(train, backend=backend, block_size=10_000, database_block_size=10_000)
    want_d, want_i = one_shot.search(queries)
    for block, db_block, rows in [(1, 97, 150), (13, 1, 26), (7, 3, 150), (64, 100, 150), (149, 399, 150)]:
        index = NearestNeighbourIndex(train, backend=backend, block_size=block, database_block_size=db_block)
        d, i = index.search(queries[:rows])
        assert torch.equal(i, want_i[:rows]), (block, db_block)
        assert torch.equal(d, want_d[:rows]), (block, db_block)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_invariant_to_permuting_the_training_set(data, backend: str) -> None:
    train, queries = data
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))
    d0, i0 = NearestNeighbourIndex(train, backend=backend).search(queries)
    d1, i1 = NearestNeighbourIndex(train[perm], backend=backend).search(queries)
    assert torch.equal(perm[i1], i0)
    assert torch.equal(d1, d0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shift", [4.0, 1024.0])
def test_invariant_to_translating_all_data(backend: str, shift: float) -> None:
    # Dyadic data translate exactly in float32, so distances must agree bit for bit, although the shifted
    # index runs its fast pass on centred rows and the original one does not.
    train, queries = dyadic(300, 24, seed=4), dyadic(60, 24, seed=5)
    queries[:10] = train[:10]
    index = NearestNeighbourIndex(train, backend=backend)
    d0, i0 = index.search(queries)
    moved = NearestNeighbourIndex(train + shift, backend=backend)
    d1, i1 = moved.search(queries + shift)
    assert index._mean is None and moved._mean is not None
    assert torch.equal(i1, i0)
    assert torch.equal(d1, d0)


def test_exact_duplicates_are_dropped_with_a_warning_and_indices_map_back() -> None:
    train = dyadic(50, 8, seed=6)
    train = torch.cat([train, train[[3, 3, 10]]])  # rows 50, 51 copy row 3; row 52 copies row 10
    with pytest.warns(UserWarning, match="3 exact duplicate rows"):
        index = NearestNeighbourIndex(train, backend="torch")
    assert index.num_train == 50 and index.num_duplicates == 3
    d, i = index.search(train[[50, 52, 49]])
    assert i[:, 0].tolist() == [3, 10, 49]
    assert d[:, 0].tolist() == [0.0, 0.0, 0.0] and bool((d[:, 1] > 0).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = NearestNeighbourIndex(train, backend="torch", dedupe=False)
    assert kept.num_train == 53
    d, i = kept.search(train[[50]])
    assert d[0].tolist() == [0.0, 0.0] and i[0].tolist() == [3, 50]


def test_dedupe_keeps_original_order_for_later_rows() -> None:
    train = dyadic(20, 4, seed=7)
    train[15] = train[2]
    with pytest.warns(UserWarning):
        index = NearestNeighbourIndex(train, backend="torch")
    _, i = index.search(train)
    expected = list(range(20))
    expected[15] = 2
    assert i[:, 0].tolist() == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_feature_fn_is_applied_to_train_and_queries(data, backend: str) -> None:
    train, queries = data

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x.flatten(1)[:, :10] * 2.0)

    index = NearestNeighbourIndex(train, backend=backend, feature_fn=features, block_size=33)
    assert index.dim == 10
    d, i = index.search(queries)
    want_d, want_i = brute_force(features(queries), features(train), 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="feature dimension 3 but the index was built with dimension 10"):
        NearestNeighbourIndex(train, feature_fn=lambda x: x.flatten(1)[:, :10]).search(queries.flatten(1)[:, :3])


def test_inputs_are_never_modified_and_the_index_owns_its_rows(data) -> None:
    train, queries = data
    train_before, queries_before = train.clone(), queries.clone()
    for backend in CPU_BACKENDS:
        copy = train.clone()
        index = NearestNeighbourIndex(copy, backend=backend)
        want = index.search(queries)
        copy.add_(100.0)  # later edits of the caller's tensor must not reach the index
        got = index.search(queries)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(train, train_before) and torch.equal(queries, queries_before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_index_survives_pickle_and_deepcopy(data, backend: str) -> None:
    train, queries = data
    index = NearestNeighbourIndex(train, backend=backend)
    want = index.search(queries)
    for other in (pickle.loads(pickle.dumps(index)), copy.deepcopy(index)):
        assert other.backend == backend
        got = other.search(queries)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_float64_and_grad_inputs_are_accepted() -> None:
    train = torch.randn(30, 5, dtype=torch.float64, requires_grad=True)
    index = NearestNeighbourIndex(train, backend="torch")
    d, i = index.search(train[:4].detach())
    assert d.dtype == torch.float32 and i[:, 0].tolist() == [0, 1, 2, 3]


def test_k_one_and_k_equal_to_num_train() -> None:
    train = dyadic(6, 3, seed=8)
    index = NearestNeighbourIndex(train, backend="torch")
    want_d, want_i = brute_force(train[:2], train, 6)
    d, i = index.search(train[:2], k=6)
    assert torch.equal(i, want_i)
    assert index.search(train[:2], k=1)[1].tolist() == [[0], [1]]


def test_auto_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    train = torch.randn(10, 4)
    monkeypatch.setattr(knn_backends, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert NearestNeighbourIndex(train).backend == "torch-bf16"  # AMX: the screen
    monkeypatch.setattr(knn_backends, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    expected = "faiss-cpu" if "faiss" in str(CPU_BACKENDS) else "torch"
    assert NearestNeighbourIndex(train).backend == expected  # no AMX: today's path
    monkeypatch.setattr(knn_backends, "import_faiss", lambda: None)
    assert NearestNeighbourIndex(train).backend == "torch"
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        NearestNeighbourIndex(train, backend="faiss-cpu")


@pytest.mark.skipif(CUDA and "faiss-gpu" in available_backends("cuda"), reason="faiss has GPUs here")
def test_faiss_gpu_request_without_gpu_says_how_to_get_it() -> None:
    with pytest.raises(ImportError, match=r"lightning-memwatch\[gpu\]"):
        NearestNeighbourIndex(torch.randn(10, 4), backend="faiss-gpu")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_queries_on_another_device_are_copied() -> None:
    train = torch.randn(50, 6)
    index = NearestNeighbourIndex(train, backend="torch")
    d, i = index.search(train[:5].cuda())
    assert d.device.type == "cpu" and i[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_bad_inputs_get_errors_that_name_the_fix() -> None:
    train = torch.randn(20, 3, 4, 4)
    index = NearestNeighbourIndex(train, backend="torch")
    bad = torch.randn(4, 3, 4, 4)
    bad[1, 0, 0, 0] = float("nan")
    bad[2, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf values"):
        index.search(bad)
    nan_train = train.clone()
    nan_train[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="train contains 1 NaN/Inf"):
        NearestNeighbourIndex(nan_train)
    with pytest.raises(ValueError, match=r"dimension 27 but the index was built with dimension 48.*same shape"):
        index.search(torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="at least 2"):
        NearestNeighbourIndex(torch.randn(1, 8))
    with pytest.raises(ValueError, match="1 distinct rows"), pytest.warns(UserWarning):
        NearestNeighbourIndex(torch.ones(5, 8))
    with pytest.raises(ValueError, match="at least 1 rows"):
        index.search(torch.empty(0, 3, 4, 4))
    with pytest.raises(TypeError, match=r"torch.uint8.*\.float\(\)"):
        index.search(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int64"):
        NearestNeighbourIndex(torch.zeros(5, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="unsqueeze"):
        index.search(torch.randn(48))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, num_train=20\]"):
        index.search(train, k=21)
    with pytest.raises(
        ValueError,
        match=r"backend must be one of \['auto', 'faiss-gpu', 'faiss-cpu', 'torch', 'torch-bf16', 'torch-int8'\]",
    ):
        NearestNeighbourIndex(train, backend="sklearn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        NearestNeighbourIndex(train, block_size=0)


# ------------------------------------------------------------------------------------ offsets, candidates
FLOAT32_CPU = [b for b in CPU_BACKENDS if b in ("torch", "faiss-cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_far_offset_is_centred_and_stays_exact(backend: str) -> None:
    # An offset 1000x the spread: the fast passes centre rows and queries on the training mean.
    g = torch.Generator().manual_seed(9)
    train = 1000.0 + torch.rand(300, 32, generator=g)
    queries = torch.cat([train[:5], 1000.0 + torch.rand(20, 32, generator=g)])
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=64)
    assert index._mean is not None
    d, i = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_well_separated_queries_are_certified_at_once(backend: str) -> None:
    # Well-separated rows: only the k nearest rows of each near copy become candidates; the midpoint of two
    # rows is a near tie and takes more, in the same scan.
    g = torch.Generator().manual_seed(10)
    train = torch.randn(300, 16, generator=g) * 10
    queries = torch.cat([train[:20] + 0.01 * torch.randn(20, 16, generator=g), (train[[30]] + train[[31]]) / 2])
    index = NearestNeighbourIndex(train, backend=backend)
    d, i = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)
    stats = index.last_search
    assert stats is not None and stats.scans == 1 and stats.queries == 21
    # bfloat16 rounds the screen's output to 2**-8 of the distance, int8 codes leave residuals of about 1/200
    # of the largest value per coordinate: a few 2nd/3rd neighbours stay candidates
    at_once = {"torch-bf16": 15, "torch-int8": 10 if knn_backends.int8_code_limit() == 127 else 7}.get(backend, 20)
    assert stats.certified_at_once >= at_once and stats.candidates >= 2 * 21


# ------------------------------------------------------------------------------------------- int8 screen
INT8 = ["torch-int8"] if "torch-int8" in CPU_BACKENDS else []


@pytest.mark.parametrize("backend", INT8)
def test_int8_screen_stays_exact_where_its_codes_cannot_narrow(backend: str) -> None:
    # Queries far outside the training values (their codes clamp: a large residual) are scored again on each
    # block with the float32 tile; a few rows far from the rest are tested one by one (wide rows); rows of one
    # value (torch's int8 GEMM is wrong for an inner dimension of 1 unless padded).
    g = torch.Generator().manual_seed(31)
    train = torch.rand(400, 24, generator=g)
    train[[100, 200, 300]] += 500.0  # beyond the code range: clamped, wide rows
    queries = torch.cat([train[:10], torch.rand(10, 24, generator=g), 1e4 * torch.rand(5, 24, generator=g)])
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=400, block_size=8)
    assert index._int8 is not None and int(index._int8.wide.sum()) >= 3
    d, i = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)
    assert index.last_search is not None and index.last_search.scans == 1
    assert index.last_search.rescanned_blocks > 0  # the far queries took the float32 tile
    one = torch.rand(50, 1, generator=g)
    d, i = NearestNeighbourIndex(one, backend=backend).search(one[:7] + 1e-3, k=2)
    assert torch.equal(i, brute_force(one[:7] + 1e-3, one, 2)[1])


def test_auto_picks_the_int8_screen_on_cpus_with_vnni_or_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    train = torch.randn(10, 4)
    monkeypatch.setattr(knn_backends, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert NearestNeighbourIndex(train).backend in ("faiss-cpu", "torch")  # AVX2 alone: float32
    for flags in ({"avx2", "avx512_vnni"}, {"avx2", "avx_vnni"}, {"amx_bf16", "amx_int8", "avx512_vnni"}):
        monkeypatch.setattr(knn_backends, "cpu_flags", lambda flags=flags: frozenset(flags))
        expected = "torch-int8" if knn_backends.int8_gemm_exact() else "torch-bf16" if "amx_bf16" in flags else None
        if expected is not None:
            assert NearestNeighbourIndex(train).backend == expected
    monkeypatch.setattr(knn_backends, "int8_code_limit", lambda: None)  # a torch whose int8 GEMM is never exact
    assert NearestNeighbourIndex(train).backend == "torch-bf16"
    with pytest.raises(ValueError, match="torch._int_mm"):
        NearestNeighbourIndex(train, backend="torch-int8")


_SATURATION_PROBE = """
import torch
from lightning_memwatch.metrics.knn import NearestNeighbourIndex
from lightning_memwatch.metrics.knn.backends import int8_code_limit
a, b = torch.full((4, 64), 127, dtype=torch.int8), torch.full((8, 64), -127, dtype=torch.int8)
wrong = not torch.equal(torch._int_mm(a, b.T).long(), a.long() @ b.long().T)
g = torch.Generator().manual_seed(0)
train, queries = torch.rand(3000, 96, generator=g), torch.rand(40, 96, generator=g)
exact = None
if int8_code_limit() is not None:
    got = NearestNeighbourIndex(train, backend="torch-int8").search(queries, 2)[1]
    exact = torch.equal(got, torch.cdist(queries.double(), train.double()).topk(2, largest=False).indices)
print(wrong, int8_code_limit(), exact)
"""


def test_int8_codes_stay_where_the_int8_gemm_is_exact() -> None:
    # oneDNN's AVX2 int8 kernel (no VNNI) sums pairs of products in saturating int16: wrong for large codes.
    # Limiting oneDNN to AVX2 shows that CPU on any x86 machine: the screen must use 7-bit codes there, and stay
    # exact.
    done = subprocess.run(
        [sys.executable, "-c", _SATURATION_PROBE],
        env=child_env(ONEDNN_MAX_CPU_ISA="AVX2", OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    wrong, limit, exact = done.stdout.split()
    assert not (wrong == "True" and limit == "127")
    assert exact in ("True", "None")
    if wrong == "True":
        assert limit == "63" and exact == "True"


@pytest.mark.parametrize("backend", INT8)
def test_int8_codes_made_per_block_without_a_copy_or_for_streamed_rows(backend: str, tmp_path) -> None:
    import numpy as np

    g = torch.Generator().manual_seed(32)
    train = torch.rand(500, 40, generator=g)
    queries = torch.cat([train[:6], torch.rand(14, 40, generator=g)])
    np.save(tmp_path / "train.npy", train.numpy())
    want_d, want_i = brute_force(queries, train, 2)
    for index in (
        NearestNeighbourIndex(train, backend=backend, screen_copy=False, database_block_size=128),
        NearestNeighbourIndex(np.load(tmp_path / "train.npy", mmap_mode="r"), backend=backend, database_block_size=128),
    ):
        assert index._int8 is not None and index._int8.codes is None  # no resident codes
        d, i = index.search(queries, k=2)
        assert torch.equal(i, want_i)
        torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)

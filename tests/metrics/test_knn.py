"""NearestNeighbourIndex: exactness against float64 brute force, blocking, invariances, bad inputs."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from lightning_memwatch.metrics import knn as knn_module
from lightning_memwatch.metrics.knn import NearestNeighbourIndex, available_backends

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


def test_uncertified_rows_fall_back_to_float64() -> None:
    # Query at the origin; many neighbours at distance ~2 differing by 1e-7 relative, plus far rows that make
    # the rounding bound large: the approximate pass cannot certify its candidates.
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
        assert index.num_fallback + index.num_screen_fallback > 0, backend  # the screen re-screens first
        assert torch.equal(indices, want_i), backend
        torch.testing.assert_close(distances.double(), want_d, rtol=1e-7, atol=0)


def test_torch_reranking_path_matches_numpy(data, monkeypatch: pytest.MonkeyPatch) -> None:
    # The GPU code path of the exact re-ranking, exercised on CPU.
    train, queries = data
    want = NearestNeighbourIndex(train, backend="torch").search(queries)
    monkeypatch.setattr(knn_module, "_NUMPY_ON_CPU", False)
    got = NearestNeighbourIndex(train, backend="torch").search(queries)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-7, atol=0)


@pytest.mark.parametrize("precision", ["high", "medium"])
def test_reduced_matmul_precision_widens_the_bound_and_stays_exact(data, precision: str) -> None:
    # TF32/bfloat16 matmuls may be enabled by the user (Lightning suggests it): the bound grows, more rows take
    # the widened pass (in float64 then), and results stay exact.
    train, queries = data
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        index = NearestNeighbourIndex(train * 30.0, backend="torch")
        distances, indices = index.search(queries * 30.0)
    finally:
        torch.set_float32_matmul_precision(previous)
    want_d, want_i = brute_force(queries * 30.0, train * 30.0, 2)
    assert index.num_fallback > 0 or precision == "high"
    assert torch.equal(indices, want_i)
    torch.testing.assert_close(distances.double(), want_d, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_ties_go_to_the_lower_row(backend: str) -> None:
    # 2 x 16 rows at exactly distance 1 from the origin, shuffled, plus far rows: every query at the origin has
    # 32 tied neighbours; the widened pass must return the two lowest row numbers.
    dim = 16
    ring = torch.cat([torch.eye(dim), -torch.eye(dim)])
    train = torch.cat([ring[torch.randperm(2 * dim, generator=torch.Generator().manual_seed(9))], 500 * ring[:2]])
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=5)
    distances, indices = index.search(torch.zeros(2, dim), k=3)
    assert distances.tolist() == [[1.0, 1.0, 1.0]] * 2
    assert indices.tolist() == [[0, 1, 2]] * 2
    assert index.num_fallback + index.num_screen_fallback == 2  # torch-bf16: its wider second screen


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
    monkeypatch.setattr(knn_module, "_cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert NearestNeighbourIndex(train).backend == "torch-bf16"  # AMX: the screen
    monkeypatch.setattr(knn_module, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    expected = "faiss-cpu" if "faiss" in str(CPU_BACKENDS) else "torch"
    assert NearestNeighbourIndex(train).backend == expected  # no AMX: today's path
    monkeypatch.setattr(knn_module, "_import_faiss", lambda: None)
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
        ValueError, match=r"backend must be one of \['auto', 'faiss-gpu', 'faiss-cpu', 'torch', 'torch-bf16'\]"
    ):
        NearestNeighbourIndex(train, backend="sklearn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        NearestNeighbourIndex(train, block_size=0)


# ------------------------------------------------------------------- offset form of the float32 pass
FLOAT32_CPU = [b for b in CPU_BACKENDS if b in ("torch", "faiss-cpu")]


def offset_sets(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Image-like sets with a common offset: uniform [0, 1], low-rank in [0, 1] with duplicates, and queries
    with exact copies, near copies (near ties) and rows far out along the mean (large ``x . mean``)."""
    g = torch.Generator().manual_seed(seed)
    uniform = torch.rand(500, 64, generator=g)
    basis = torch.randn(4, 64, generator=g)
    lowrank = torch.sigmoid(torch.randn(500, 4, generator=g) @ basis).clamp(0, 1)
    out = {}
    for name, train in (("uniform", uniform), ("lowrank", lowrank)):
        train[400:410] = train[10:20]  # exact duplicates inside the training set
        mean = train.mean(dim=0)
        queries = torch.cat(
            [
                train[[0, 15, 405, 499]],  # exact copies (405 duplicates 15)
                train[100:130] + 1e-5 * torch.randn(30, 64, generator=g),  # near copies
                torch.rand(30, 64, generator=g),
                mean + 3 * (train[200:210] - mean),  # far from the mean, both ways
                4 * mean + 0.1 * torch.rand(5, 64, generator=g),  # far along the mean: x . mean >> 0
                (-2 * mean)[None],  # far against it: x . mean << 0
            ]
        )
        out[name] = (train, queries)
    return out


@pytest.mark.parametrize("backend", FLOAT32_CPU)
@pytest.mark.parametrize("kind", ["uniform", "lowrank"])
@pytest.mark.parametrize("dedupe", [True, False])
def test_offset_form_equals_float64_brute_force(backend: str, kind: str, dedupe: bool) -> None:
    train, queries = offset_sets(7)[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the duplicate warning
        index = NearestNeighbourIndex(train, backend=backend, dedupe=dedupe, database_block_size=128, block_size=32)
    assert index._shift_norms64 is not None  # [0, 1] data: raw rows at most ~2-3x the centred ones
    d, i = index.search(queries, k=3)
    keep = torch.ones(len(train), dtype=torch.bool)
    if dedupe:
        keep[400:410] = False
    want_d, want_local = brute_force(queries, train[keep], 3)
    assert torch.equal(i, keep.nonzero().flatten()[want_local])
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)
    assert d[:4, 0].tolist() == [0.0] * 4
    if not dedupe:  # the copy of a duplicated row ties at 0 with it: lower row first
        assert i[2, :2].tolist() == [15, 405] and d[2, :2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if CUDA else []))
def test_offset_form_bound_holds_for_every_row(device: str) -> None:
    # All rows as candidates: every approximate distance of the offset form lies within its bound of the
    # float64 one, and the bound is not vacuous (within 10^4 of the largest error seen).
    train, queries = offset_sets(8)["uniform"]
    train, queries = train.to(device), queries.to(device)
    index = NearestNeighbourIndex(train, backend="torch", dedupe=False)
    q_fast = index._centred(queries)
    q_norms = (q_fast * q_fast).sum(dim=1).double()
    shift = index._offset_shift(q_fast)
    scores, cand = index._torch_topc(q_fast, index.num_train, True)
    approx = scores.double() + q_norms[:, None] + shift[:, None]
    true = ((queries.double()[:, None, :] - train.double()[cand]) ** 2).sum(dim=2)  # cand: all rows
    err = (approx - true).abs()
    bound = index._offset_bound(q_norms)[:, None]
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 1e-4


@pytest.mark.parametrize("backend", FLOAT32_CPU)
def test_far_offset_keeps_centred_rows_and_stays_exact(backend: str) -> None:
    # An offset 1000x the spread would make the offset form's bound useless: the pass centres the rows instead.
    g = torch.Generator().manual_seed(9)
    train = 1000.0 + torch.rand(300, 32, generator=g)
    queries = torch.cat([train[:5], 1000.0 + torch.rand(20, 32, generator=g)])
    index = NearestNeighbourIndex(train, backend=backend, database_block_size=64)
    assert index._mean is not None and index._shift_norms64 is None
    d, i = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)


@pytest.mark.skipif("faiss-cpu" not in FLOAT32_CPU, reason="needs faiss-cpu")
@pytest.mark.parametrize(("dim", "raw"), [(1024, True), (8200, False)])
def test_faiss_cpu_searches_raw_rows_of_images_up_to_8192_dimensions(
    dim: int, raw: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Above 8,192 dimensions the raw rows' bound (about 4x the centred one for [0, 1] data) leaves many rows
    # uncertified: faiss-cpu centres the blocks instead. Either way the answer is the float64 one.
    g = torch.Generator().manual_seed(11)
    train = torch.rand(120, dim, generator=g)
    queries = torch.cat(
        [train[:3], train[3:8] + 1e-4 * torch.rand(5, dim, generator=g), torch.rand(4, dim, generator=g)]
    )
    index = NearestNeighbourIndex(train, backend="faiss-cpu")
    assert index._shift_norms64 is not None  # a moderate offset: the raw rows are candidates for the raw pass
    seen: list[bool] = []
    search = NearestNeighbourIndex._faiss_topc

    def spy(self: NearestNeighbourIndex, q: torch.Tensor, c: int, raw: bool = False) -> tuple:
        seen.append(raw)
        return search(self, q, c, raw=raw)

    monkeypatch.setattr(NearestNeighbourIndex, "_faiss_topc", spy)
    d, i = index.search(queries, k=2)
    assert seen and set(seen) == {raw}
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)


def test_reranking_skips_candidates_that_cannot_be_nearest(monkeypatch: pytest.MonkeyPatch) -> None:
    # Well-separated rows: only the k nearest candidates of each query get exact distances; near ties still
    # get all of them (and the answer stays exact).
    g = torch.Generator().manual_seed(10)
    train = torch.randn(300, 16, generator=g) * 10
    queries = torch.cat([train[:20] + 0.01 * torch.randn(20, 16, generator=g), (train[[30]] + train[[31]]) / 2])
    widths: list[int] = []
    exact_sq = NearestNeighbourIndex._exact_sq

    def counting(self: NearestNeighbourIndex, q: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        widths.extend([cand.shape[1]] * len(q))
        return exact_sq(self, q, cand)

    monkeypatch.setattr(NearestNeighbourIndex, "_exact_sq", counting)
    index = NearestNeighbourIndex(train, backend="torch")
    d, i = index.search(queries, k=2)
    want_d, want_i = brute_force(queries, train, 2)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(d.double(), want_d, rtol=1e-6, atol=0)
    assert widths.count(2) >= 20  # the near copies: their two nearest only
    assert max(widths) == 2 + knn_module._candidate_slack(16)  # the midpoint's tie: every candidate

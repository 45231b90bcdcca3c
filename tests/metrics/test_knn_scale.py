"""NearestNeighbourIndex at scale: split-bf16 screen, streamed rows, non-finite bounds, shapes, build memory."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lightning_memwatch.metrics.knn import NearestNeighbourIndex
from lightning_memwatch.metrics.knn.backends import import_faiss

torch.set_num_threads(1)


def brute_force64(queries: torch.Tensor, train: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 differences, ascending, ties by lower index (squared distances)."""
    q = queries.reshape(len(queries), -1).double()
    t = train.reshape(len(train), -1).double()
    d = ((q[:, None, :] - t[None, :, :]) ** 2).sum(dim=2)
    values, order = d.sort(dim=1, stable=True)
    return values[:, :k], order[:, :k]


def adversarial(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Near ties, exact duplicates, a large common offset, large and tiny norms, copies."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(300, 48, generator=g)
    train = torch.cat(
        [
            base,  # image-like, offset 0.5
            1000.0 + base[:50] * 1e-3,  # far away, tiny spread: a large common offset
            base[:40] + 1e-6 * torch.randn(40, 48, generator=g),  # near copies of other rows (near ties)
            1e-30 * torch.randn(20, 48, generator=g),  # tiny norms
            torch.full((5, 48), 0.25),  # all-equal rows (duplicates of each other)
        ]
    )
    queries = torch.cat(
        [
            train[[0, 5, 300, 345, 350, 395, 410]],  # exact copies
            (train[10] + train[11]) / 2 + torch.zeros(1, 48),  # a midpoint
            base[100:140] + 1e-7 * torch.randn(40, 48, generator=g),  # near copies, the nearest nearly tied
            torch.rand(30, 48, generator=g),
            1000.0 + torch.rand(5, 48, generator=g) * 1e-3,
            torch.zeros(2, 48),
        ]
    )
    return train, queries


@pytest.mark.parametrize("seed", [0, 1])
def test_screened_backend_equals_float64_brute_force_on_adversarial_data(seed: int) -> None:
    train, queries = adversarial(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = NearestNeighbourIndex(train, backend="torch-bf16", database_block_size=64, block_size=32)
        kept = NearestNeighbourIndex(train, backend="torch-bf16", dedupe=False, database_block_size=64)
    assert index.num_duplicates == 4
    d, i = index.search(queries, k=3)
    keep = torch.ones(len(train), dtype=torch.bool)
    keep[[411, 412, 413, 414]] = False  # the repeated all-equal rows (dedupe keeps the first)
    want_d, want_local = brute_force64(queries, train[keep], 3)
    want_i = keep.nonzero().flatten()[want_local]
    assert torch.equal(i, want_i)
    assert torch.equal(d, want_d.sqrt().float())
    assert d[:7, 0].tolist() == [0.0] * 7
    d_all, i_all = kept.search(queries, k=2)
    want_d, want_i = brute_force64(queries, train, 2)
    assert torch.equal(i_all, want_i) and torch.equal(d_all, want_d.sqrt().float())
    assert index.last_search is not None and index.last_search.scans == 1
    plain = NearestNeighbourIndex(train[:300], backend="torch-bf16")  # image-like rows only
    d, i = plain.search(queries[7:], k=2)
    want_d, want_i = brute_force64(queries[7:], train[:300], 2)
    assert torch.equal(i, want_i) and torch.equal(d, want_d.sqrt().float())
    stats = plain.last_search
    assert stats is not None and stats.scans == 1
    assert stats.certified_at_once < stats.queries  # the near ties: more candidates, no second scan


@pytest.mark.parametrize("backend", ["torch", "torch-bf16"])
def test_query_overflowing_float32_never_certifies(backend: str) -> None:
    # A query of 1e20 has a squared norm that overflows float32: the bound is inf, the difference NaN; before,
    # NaN compared as "certified" and an exact tie was broken the wrong way on the torch backend.
    train = torch.zeros(40, 4)
    train[:, 0] = torch.arange(40.0)
    v = float(torch.tensor(1e20))  # 1e20 rounded to float32; its neighbours at +-2**47 are float32 too
    train[7, 0], train[3, 0] = v + 2**47, v - 2**47  # a tie at 2**47 around the query; row 3 is lower
    query = torch.tensor([[v, 0.0, 0.0, 0.0]])
    index = NearestNeighbourIndex(train, backend=backend)
    d, i = index.search(query, k=2)
    assert i.tolist() == [[3, 7]]
    assert d[0, 0] == d[0, 1] == 2.0**47
    assert index.last_search is not None  # float32 cannot hold it: the one scan is in float64
    assert index.last_search.float64_queries == 1 and index.last_search.scans == 1


def test_queries_must_have_the_training_per_sample_shape() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(30, 3, 8, 8, generator=g)
    index = NearestNeighbourIndex(train, backend="torch")
    with pytest.raises(ValueError, match=r"channels-last.*permute\(0, 3, 1, 2\)"):
        index.search(train[:4].permute(0, 2, 3, 1).contiguous())
    with pytest.raises(ValueError, match=r"per-sample shape \(192,\) against \(3, 8, 8\)"):
        index.search(train[:4].reshape(4, -1))
    assert index.search(train[:2])[1][:, 0].tolist() == [0, 1]
    features = NearestNeighbourIndex(train, backend="torch", feature_fn=lambda x: x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match=r"feature shape \(8,\) against \(3,\)"):
        features.search(torch.rand(2, 8, 3, 3, generator=g))  # other input shape, other feature shape


def test_streamed_memmap_equals_in_memory(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(500, 2, 6, 6, generator=g)
    train[321] = train[12]
    queries = torch.cat([train[[3, 12, 321, 499]], torch.rand(20, 2, 6, 6, generator=g)])
    np.save(tmp_path / "train.npy", train.numpy())
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    for backend in ("torch", "torch-bf16", *(["faiss-cpu"] if import_faiss() else [])):
        with pytest.warns(UserWarning, match="1 exact duplicate"):
            held = NearestNeighbourIndex(train, backend=backend, database_block_size=64)
        with pytest.warns(UserWarning, match="1 exact duplicate"):
            streamed = NearestNeighbourIndex(mm, backend=backend, database_block_size=64)  # type: ignore[arg-type]
        assert streamed.streamed and not held.streamed and streamed.num_train == held.num_train == 499
        want = held.search(queries, k=3)
        got = streamed.search(queries, k=3)
        # the same float32 rows, the same float64 re-ranking: equal (distances within float64 rounding)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
        assert torch.equal(streamed.train_images(got[1][:3]), train[got[1][:3]])
    assert not mm.flags.writeable and np.array_equal(mm, train.numpy())  # never altered


def test_memmap_of_the_wrong_dtype_says_how_to_fix_it(tmp_path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((10, 4), dtype=np.float64))
    with pytest.raises(TypeError, match=r"dtype float64.*astype\(np.float32\)"):
        NearestNeighbourIndex(np.load(tmp_path / "x.npy", mmap_mode="r"))  # type: ignore[arg-type]


def test_train_images_reads_rows_back_through_duplicates() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(50, 1, 4, 4, generator=g)
    train[30] = train[2]
    with pytest.warns(UserWarning):
        index = NearestNeighbourIndex(train, backend="torch")
    _, idx = index.search(train[[2, 30, 40]], k=2)
    assert torch.equal(index.train_images(idx), train[idx])
    with pytest.raises(ValueError, match="removed as duplicates"):
        index.train_images(torch.tensor([30]))


def test_the_index_holds_one_copy_of_offset_data() -> None:
    # images in [0, 1] have a common offset: the fast pass is centred, per database block, not on a second copy
    g = torch.Generator().manual_seed(0)
    train = torch.rand(200, 64, generator=g)
    index = NearestNeighbourIndex(train, backend="torch")
    assert index._mean is not None
    held = [v for v in vars(index).values() if isinstance(v, torch.Tensor) and v.numel() >= train.numel()]
    held += [index.row_source.rows]
    assert sum(t.numel() for t in {id(t): t for t in held}.values()) == train.numel()


def test_streamed_memmap_search_gives_no_numpy_writability_warning(tmp_path) -> None:
    # torch.from_numpy on a read-only memmap block warned "The given NumPy array is not writable" on every block
    g = torch.Generator().manual_seed(1)
    train = torch.rand(300, 12, generator=g)
    np.save(tmp_path / "train.npy", train.numpy())
    mm = np.load(tmp_path / "train.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index = NearestNeighbourIndex(mm, backend="torch", database_block_size=64)  # type: ignore[arg-type]
        _, idx = index.search(train[:5])
        images = index.train_images(idx)
    assert idx[:, 0].tolist() == [0, 1, 2, 3, 4] and torch.equal(images[:, 0], train[:5])

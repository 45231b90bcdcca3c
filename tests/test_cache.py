"""Content fingerprints and the atomic tensor cache (lightning_memwatch.cache)."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_memwatch import cache as cache_module
from lightning_memwatch.cache import (
    CACHE_DIR_ENV,
    RowSetFingerprint,
    TensorCache,
    default_cache_dir,
    fingerprint_file,
    fingerprint_module,
    fingerprint_tensor,
    make_key,
)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(12, 1, 4, 4, generator=torch.Generator().manual_seed(0))


# ---- tensors -----------------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_order_and_batching_independent(images: torch.Tensor) -> None:
    reference = fingerprint_tensor(images)
    assert reference == fingerprint_tensor(images.clone())
    assert len(reference) == 64
    assert fingerprint_tensor(images[torch.randperm(len(images))]) == reference
    incremental = RowSetFingerprint()
    for chunk in (images[:5], images[5:6], images[6:]):
        incremental.update(chunk)
    assert incremental.num_rows == len(images)
    assert incremental.hexdigest() == reference


def test_fingerprint_changes_with_one_value_dtype_shape_and_multiplicity(images: torch.Tensor) -> None:
    reference = fingerprint_tensor(images)
    changed = images.clone()
    changed[7, 0, 2, 3] += 1e-6
    assert fingerprint_tensor(changed) != reference
    assert fingerprint_tensor(images.double()) != reference
    assert fingerprint_tensor(images.reshape(12, 1, 2, 8)) != reference
    assert fingerprint_tensor(images.reshape(6, 2, 4, 4)) != reference
    assert fingerprint_tensor(torch.cat([images, images[:1]])) != reference
    assert fingerprint_tensor(images[:-1]) != reference


def test_fingerprint_handles_views_other_dtypes_and_leaves_input_alone(images: torch.Tensor) -> None:
    wide = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    view = wide[:, 1:2, ::2, ::2]  # non-contiguous
    before = view.clone()
    assert fingerprint_tensor(view) == fingerprint_tensor(view.contiguous())
    assert torch.equal(view, before)
    assert fingerprint_tensor(images.bfloat16()) != fingerprint_tensor(images.half())
    assert fingerprint_tensor(torch.zeros(3, 2, dtype=torch.bool)) != fingerprint_tensor(torch.zeros(3, 2))


def test_rowset_refuses_mixed_batches() -> None:
    fp = RowSetFingerprint()
    fp.update(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="dtype and per-row shape"):
        fp.update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="dtype and per-row shape"):
        fp.update(torch.zeros(2, 3, dtype=torch.float64))


# ---- modules, files, keys ----------------------------------------------------------------------------------


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.register_buffer("scale", torch.ones(2))


class _SmallTwin(_Small):
    pass


def test_fingerprint_module_tracks_class_weights_and_buffers() -> None:
    torch.manual_seed(0)
    a = _Small()
    b = _Small()
    b.load_state_dict(a.state_dict())
    assert fingerprint_module(a) == fingerprint_module(b)
    twin = _SmallTwin()
    twin.load_state_dict(a.state_dict())
    assert fingerprint_module(twin) != fingerprint_module(a)
    with torch.no_grad():
        b.conv.weight[0, 0, 0, 0] += 1e-4
    assert fingerprint_module(b) != fingerprint_module(a)
    b.load_state_dict(a.state_dict())
    b.scale.mul_(2)
    assert fingerprint_module(b) != fingerprint_module(a)


def test_fingerprint_file_is_sha256(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert fingerprint_file(path) == hashlib.sha256(data).hexdigest()


def test_make_key_ignores_key_order_and_refuses_tensors() -> None:
    assert make_key({"a": 1, "b": [1.5, "x"]}) == make_key({"b": [1.5, "x"], "a": 1})
    assert make_key({"a": 1}) != make_key({"a": 2})
    with pytest.raises(TypeError, match="JSON"):
        make_key({"a": torch.zeros(1)})


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv(CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "lightning_memwatch"


# ---- TensorCache -------------------------------------------------------------------------------------------


def test_cache_round_trip_and_miss(tmp_path: Path) -> None:
    store = TensorCache(tmp_path / "sub", namespace="unit")
    assert store.load("k") is None
    cov = torch.randn(5, 5, dtype=torch.float64)
    path = store.save("k", {"cov": cov}, meta={"n": 3})
    assert path == tmp_path / "sub" / "unit-k.pt" and path.is_file()
    entry = store.load("k")
    assert entry is not None
    assert entry["meta"] == {"n": 3}
    assert entry["tensors"]["cov"].dtype == torch.float64
    assert torch.equal(entry["tensors"]["cov"], cov)
    assert [p.name for p in path.parent.iterdir()] == ["unit-k.pt"]  # no temporary file left


def test_failed_write_leaves_previous_entry_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TensorCache(tmp_path, namespace="unit")
    store.save("k", {"x": torch.zeros(3)})

    def crash_midway(obj: object, f: object) -> None:
        f.write(b"partial garbage")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(cache_module.torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        store.save("k", {"x": torch.ones(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit-k.pt"]
    entry = store.load("k")
    assert entry is not None and torch.equal(entry["tensors"]["x"], torch.zeros(3))


def test_unreadable_or_mismatched_entry_is_a_miss_with_warning(tmp_path: Path) -> None:
    store = TensorCache(tmp_path, namespace="unit")
    store.path("bad").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        assert store.load("bad") is None
    store.save("a", {"x": torch.zeros(1)})
    os.replace(store.path("a"), store.path("b"))  # an entry under the wrong name
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        assert store.load("b") is None
    store.save("b", {"x": torch.ones(1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        entry = store.load("b")
    assert entry is not None and torch.equal(entry["tensors"]["x"], torch.ones(1))


def test_save_does_not_touch_caller_tensors(tmp_path: Path) -> None:
    x = torch.arange(4.0)
    TensorCache(tmp_path).save("k", {"x": x})
    assert torch.equal(x, torch.arange(4.0))

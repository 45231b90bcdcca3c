"""CelebA loader on generated folders of small JPEG/PNG images laid out like CelebA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_memwatch.apps.data import celeba
from lightning_memwatch.apps.data.celeba import CelebA32DataModule, natural_key, preprocess_image

torch.set_num_threads(1)
NUM_IMAGES = 30


def _level(i: int) -> int:
    return 8 * i  # gray level of image number i (1-based): 8 .. 240


def _make_folder(folder: Path, count: int = NUM_IMAGES, suffix: str = ".jpg") -> Path:
    """``count`` constant-gray 24x20 images named 1.jpg .. count.jpg (natural order != lexicographic)."""
    folder.mkdir(parents=True)
    for i in range(1, count + 1):
        Image.new("RGB", (20, 24), (_level(i),) * 3).save(folder / f"{i}{suffix}", quality=100)
    return folder


@pytest.fixture()
def celeba_root(tmp_path: Path) -> Path:
    _make_folder(tmp_path / "CelebA" / "img_align_celeba")
    return tmp_path / "CelebA"


def _module(root: Path, tmp_path: Path, **kwargs) -> CelebA32DataModule:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    dm = CelebA32DataModule(str(root), **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _levels(images: torch.Tensor, mean: float) -> list[int]:
    return [round((float(x.mean()) + mean) * 255) for x in images]


def test_natural_key_orders_numbers_numerically() -> None:
    names = ["10.jpg", "2.jpg", "1.jpg", "000003.jpg"]
    assert sorted(names, key=natural_key) == ["1.jpg", "2.jpg", "000003.jpg", "10.jpg"]


def test_order_subset_slice_heldout_and_centering(celeba_root: Path, tmp_path: Path) -> None:
    dm = _module(celeba_root, tmp_path, n=5, index=1, num_heldout=8)
    train, heldout = dm.train_images(), dm.heldout_images()
    assert train.shape == (5, 1, 32, 32) and heldout.shape == (8, 1, 32, 32)
    assert dm.sample_shape == (1, 32, 32) and dm.batch_size == 5
    mean = dm.mean
    assert mean is not None
    # slice [index*n, (index+1)*n) of the natural order: images 6..10; held-out: the last 8 (23..30)
    assert _levels(train, mean) == pytest.approx([_level(i) for i in range(6, 11)], abs=2)
    assert _levels(heldout, mean) == pytest.approx([_level(i) for i in range(23, 31)], abs=2)
    # centred by the *training* mean (no division); held-out shares it
    expected_mean = sum(_level(i) for i in range(6, 11)) / 5 / 255
    assert mean == pytest.approx(expected_mean, abs=2 / 255)
    assert abs(float(train.mean())) < 1e-6
    assert dm.data_range == pytest.approx((-mean, 1 - mean))
    assert float(heldout.mean()) > 0.3  # later (brighter) images, not re-centred on themselves
    assert torch.equal(dm.reference_images(), heldout)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (5, 1, 32, 32)


def test_minus_one_one_option(celeba_root: Path, tmp_path: Path) -> None:
    dm = _module(celeba_root, tmp_path, n=4, num_heldout=4, normalization="minus_one_one")
    assert dm.data_range == (-1.0, 1.0)
    first = float(dm.train_images()[0].mean())
    assert first == pytest.approx(_level(1) / 255 * 2 - 1, abs=0.02)


def test_cache_is_written_once_and_reused(celeba_root: Path, tmp_path: Path, monkeypatch) -> None:
    first = _module(celeba_root, tmp_path, n=4, num_heldout=4)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(celeba, "load_images", refuse)
    again = _module(celeba_root, tmp_path, n=4, num_heldout=4)
    assert torch.equal(first.train_images(), again.train_images())
    # another selection is another cache entry
    monkeypatch.undo()
    _module(celeba_root, tmp_path, n=4, index=1, num_heldout=4)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2
    # cache disabled: nothing written
    _module(celeba_root, tmp_path, n=3, num_heldout=4, cache_dir="")
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2


def test_torchvision_layout_image_folder_itself_and_pt_tensor(tmp_path: Path) -> None:
    _make_folder(tmp_path / "tv" / "celeba" / "img_align_celeba", count=12)
    dm = _module(tmp_path / "tv", tmp_path, n=4, num_heldout=4)
    assert _levels(dm.train_images(), dm.mean)[0] == pytest.approx(_level(1), abs=2)
    direct = _module(tmp_path / "tv" / "celeba" / "img_align_celeba", tmp_path, n=4, num_heldout=4)
    assert torch.equal(direct.train_images(), dm.train_images())
    tensor = torch.linspace(0, 1, 20).reshape(20, 1, 1, 1).expand(20, 1, 32, 32).clone()
    torch.save(tensor, tmp_path / "CelebA32.pt")
    pt = _module(tmp_path / "CelebA32.pt", tmp_path, n=3, index=2, num_heldout=5)
    assert torch.allclose(pt.train_images()[:, 0, 0, 0] + pt.mean, tensor[6:9, 0, 0, 0])
    assert torch.allclose(pt.heldout_images()[:, 0, 0, 0] + pt.mean, tensor[15:, 0, 0, 0])


def test_preprocessing_resizes_short_side_center_crops_and_uses_luma(tmp_path: Path) -> None:
    # 64x32 (W x H): black borders, white central 32 columns -> after center crop: all white
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 48, 32))
    out = preprocess_image(image, 32)
    assert out.shape == (1, 32, 32) and torch.allclose(out, torch.ones_like(out), atol=1e-3)  # luma: .9999
    # short side 64 -> 32 (downscale), pure red -> luma 0.299
    red = preprocess_image(Image.new("RGB", (64, 80), (255, 0, 0)), 32)
    assert red.shape == (1, 32, 32) and float(red.mean()) == pytest.approx(0.299, abs=2e-3)
    _make_folder(tmp_path / "png", count=10, suffix=".png")
    dm = _module(tmp_path / "png", tmp_path, n=2, num_heldout=2)
    assert _levels(dm.train_images(), dm.mean) == [_level(1), _level(2)]  # PNG is lossless


def test_errors_name_the_fix(celeba_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlaps the held-out"):
        _module(celeba_root, tmp_path, n=20, num_heldout=11)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        _module(tmp_path / "empty", tmp_path, n=2)
    with pytest.raises(ValueError, match="normalization"):
        CelebA32DataModule(str(celeba_root), normalization="standardize")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="setup"):
        CelebA32DataModule(str(celeba_root), n=4).train_images()

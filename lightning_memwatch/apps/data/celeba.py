"""CelebA 32x32 grayscale, selected and normalised as in the paper (``paper_protocol.md`` section 1.1).

Sources accepted by ``root`` (CelebA cannot be downloaded by this package; get it from the official site or
``torchvision.datasets.CelebA(root, download=True)`` where that works):

* torchvision's layout ``root/celeba/img_align_celeba/*.jpg``;
* a folder holding ``img_align_celeba/`` (``root/img_align_celeba/*.jpg``), or that image folder itself;
* a ``.pt`` file with one float tensor (N, 1, R, R) in [0, 1] already preprocessed (like the authors'
  ``CelebA32.pt``).

Preprocessing of each image (the authors' ``load_CelebA`` transform): decode to RGB floats in [0, 1], resize
the short side to ``resolution`` (bilinear, antialiased), center-crop to ``resolution`` x ``resolution``,
convert to gray (luma ``0.299 R + 0.587 G + 0.114 B``). Images are taken in natural filename order.

Selection: training images ``[index * n, (index + 1) * n)``; held-out images = the *last* ``num_heldout``
(2048) of the folder, never overlapping the training slice.

Normalisation (``normalization="center"``, the paper): subtract the scalar mean of the ``n`` training
images from both sets, no division: data in ``(-mean, 1 - mean)``, which is this datamodule's
``data_range``. ``"minus_one_one"`` gives ``2 x - 1`` in (-1, 1) instead.

Cache: the preprocessed [0, 1] images of the selection are saved (float32, atomically, with
:class:`lightning_memwatch.cache.TensorCache`) under ``cache_dir``, keyed by the file list (names and sizes),
resolution and selection, so later runs skip decoding.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_memwatch.apps.data.base import (
    Normalization,
    TensorDataModule,
    check_normalization,
    normalize_unit_images,
)
from lightning_memwatch.cache import TensorCache, default_cache_dir, make_key

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
CACHE_VERSION = 1


def natural_key(name: str) -> list[object]:
    """Sort key that orders embedded integers numerically ("2.jpg" before "10.jpg"), like ``natsort``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_image_folder(root: str | os.PathLike[str]) -> Path:
    """Resolve ``root`` to the folder of CelebA images (see the module docstring for the layouts)."""
    base = Path(root).expanduser()
    candidates = [base / "celeba" / "img_align_celeba", base / "img_align_celeba", base]
    for folder in candidates:
        if folder.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
            return folder
    raise FileNotFoundError(
        f"No CelebA images found under {base}: looked for *.jpg/*.png in "
        + ", ".join(str(c) for c in candidates)
        + ". Point `root` at torchvision's CelebA root, at a folder holding img_align_celeba/, or at a "
        "preprocessed (N, 1, 32, 32) .pt tensor."
    )


def list_images(folder: Path) -> list[Path]:
    """Image files of ``folder`` in natural filename order."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: natural_key(p.name))


def preprocess_image(image: Image.Image, resolution: int = 32) -> Tensor:
    """RGB [0, 1] -> resize short side (bilinear, antialias) -> center crop -> gray: (1, R, R) float32."""
    x = TF.to_dtype(TF.pil_to_tensor(image.convert("RGB")), torch.float32, scale=True)
    x = TF.resize(x, [resolution], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    x = TF.center_crop(x, [resolution, resolution])
    return TF.rgb_to_grayscale(x, num_output_channels=1).clamp_(0.0, 1.0)


class _ImageFiles(Dataset):
    def __init__(self, files: list[Path], resolution: int) -> None:
        self.files = files
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        with Image.open(self.files[i]) as image:
            return preprocess_image(image, self.resolution)


def load_images(files: list[Path], resolution: int = 32, workers: int = 0, progress: bool = True) -> Tensor:
    """Decode and preprocess ``files`` in order into one (len(files), 1, R, R) tensor in [0, 1]."""
    if not files:
        return torch.empty(0, 1, resolution, resolution)
    loader = DataLoader(_ImageFiles(files, resolution), batch_size=256, num_workers=workers, shuffle=False)
    batches: list[Tensor] = []
    bar = None
    if progress and len(files) > 2048:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(files), desc="Preprocessing CelebA", unit="img")
    for batch in loader:
        batches.append(batch)
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    return torch.cat(batches)


class CelebA32DataModule(TensorDataModule):
    """CelebA at 32x32 gray, the paper's training subset, held-out set and centering.

    Args:
        root: CelebA location (torchvision root, folder holding ``img_align_celeba/``, it, or a ``.pt``).
        n: Training set size (images).
        index: Which disjoint slice: training images ``[index * n, (index + 1) * n)`` (the paper's ``-i``).
        num_heldout: Held-out images, the last ones of the folder (2048 in the paper).
        resolution: Side of the square images (pixels).
        normalization: ``"center"`` (the paper: minus the training mean) or ``"minus_one_one"``.
        cache_dir: Where the preprocessed selection is cached; ``None``: ``celeba32/`` under
            :func:`lightning_memwatch.cache.default_cache_dir`; ``""``: no cache.
        decode_workers: Processes decoding JPEGs on a cache miss (0: in the main process).
        batch_size: See :class:`~lightning_memwatch.apps.data.base.TensorDataModule` (``None``: ``min(512, n)``).
        max_batch_size: See the base class.
        full_batch: See the base class (``batch_size = n``).
        num_workers: Training DataLoader workers.
        pin_memory: See the base class.
        passes_per_epoch: See the base class (1: the paper's loader).
    """

    def __init__(
        self,
        root: str,
        n: int = 1024,
        index: int = 0,
        num_heldout: int = 2048,
        resolution: int = 32,
        normalization: Normalization = "center",
        cache_dir: str | None = None,
        decode_workers: int = 0,
        batch_size: int | None = None,
        max_batch_size: int = 512,
        full_batch: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__(n, batch_size, max_batch_size, full_batch, num_workers, pin_memory, passes_per_epoch)
        if index < 0 or num_heldout < 1 or resolution < 4:
            raise ValueError(
                "Need index >= 0, num_heldout >= 1, resolution >= 4; "
                f"got {index}, {num_heldout}, {resolution}."
            )
        self.root = root
        self.index = index
        self.num_heldout = num_heldout
        self.resolution = resolution
        self.normalization: Normalization = normalization
        self.cache_dir = cache_dir
        self.decode_workers = decode_workers
        self.mean: float | None = None
        check_normalization(normalization)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, self.resolution, self.resolution)

    # ------------------------------------------------------------------ selection and cache
    def _slices(self, total: int) -> tuple[slice, slice]:
        start, stop = self.index * self.n, (self.index + 1) * self.n
        if stop > total - self.num_heldout:
            raise ValueError(
                f"The training slice [{start}, {stop}) overlaps the held-out last {self.num_heldout} of "
                f"{total} images: lower n or index, or num_heldout."
            )
        return slice(start, stop), slice(total - self.num_heldout, total)

    def _cache(self, files: list[Path]) -> tuple[TensorCache, str] | None:
        """The cache holding this selection and its key (``None`` when caching is off)."""
        if self.cache_dir == "":
            return None
        digest = hashlib.sha256()
        for f in files:
            digest.update(f"{f.name}:{f.stat().st_size}\n".encode())
        key = make_key(
            {
                "v": CACHE_VERSION,
                "files": digest.hexdigest(),
                "resolution": self.resolution,
                "n": self.n,
                "index": self.index,
                "heldout": self.num_heldout,
            }
        )
        base = Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir() / "celeba32"
        return TensorCache(base, namespace=f"celeba{self.resolution}-n{self.n}-i{self.index}"), key

    def load_unit_images(self) -> tuple[Tensor, Tensor]:
        """The selected training and held-out images in [0, 1], from the cache (built on a miss)."""
        if str(self.root).endswith(".pt"):
            full = torch.load(self.root, map_location="cpu", weights_only=True)
            if not isinstance(full, Tensor) or full.ndim != 4 or full.shape[1] != 1:
                raise ValueError(f"{self.root} must hold one tensor (N, 1, R, R) in [0, 1].")
            train_slice, heldout_slice = self._slices(len(full))
            return full[train_slice].float().clone(), full[heldout_slice].float().clone()
        files = list_images(find_image_folder(self.root))
        train_slice, heldout_slice = self._slices(len(files))
        cache = self._cache(files)
        entry = cache[0].load(cache[1]) if cache is not None else None
        if entry is not None:
            tensors = entry["tensors"]
            return tensors["train"], tensors["heldout"]  # type: ignore[index]
        train = load_images(files[train_slice], self.resolution, self.decode_workers)
        heldout = load_images(files[heldout_slice], self.resolution, self.decode_workers)
        if cache is not None:
            meta = {"root": str(self.root), "num_files": len(files), "first_file": files[0].name}
            cache[0].save(cache[1], {"train": train, "heldout": heldout}, meta=meta)
        return train, heldout

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Build the cache once (on local rank 0 only, as Lightning calls it)."""
        if self.cache_dir != "" and not str(self.root).endswith(".pt"):
            self.load_unit_images()

    def build(self) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
        train, heldout = self.load_unit_images()
        train, heldout, data_range, self.mean = normalize_unit_images(train, heldout, self.normalization)
        return train, heldout, data_range

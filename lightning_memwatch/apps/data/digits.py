"""scikit-learn's handwritten digits: 1,797 real 8x8 gray images shipped inside scikit-learn (works offline).

A seeded permutation splits the images once: the last ``num_heldout`` are held out (the FID reference and
the demo's classifier data); training images are ``[index * n, (index + 1) * n)`` of the rest, so a
larger ``n`` with the same seed extends the smaller training set. Pixel values 0..16 are divided by 16,
optionally upscaled (bilinear) to ``image_size``, then normalised like CelebA (``"minus_one_one"`` by
default here; ``"center"`` subtracts the training mean as the paper does).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_memwatch.apps.data.base import (
    LabelledTensorDataset,
    Normalization,
    TensorDataModule,
    check_normalization,
    normalize_unit_images,
)

NUM_DIGITS = 1797


def load_digits_unit() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as (1797, 1, 8, 8) float32 in [0, 1] and their labels (1797,) int64, in file order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(TensorDataModule):
    """scikit-learn digits as a training subset of ``n`` images plus a held-out split.

    Args:
        n: Training set size (images); ``(index + 1) * n <= 1797 - num_heldout``.
        index: Disjoint slice of the training pool (like CelebA's ``index``).
        num_heldout: Held-out images (never trained on).
        image_size: Side of the returned images (8: native; e.g. 32 to feed the paper's U-Net).
        normalization: ``"minus_one_one"`` (default) or ``"center"`` (minus the training mean).
        split_seed: Seed of the permutation that defines the split.
        batch_size: See :class:`~lightning_memwatch.apps.data.base.TensorDataModule` (``None``: ``min(512, n)``).
        max_batch_size: See the base class.
        full_batch: See the base class (``batch_size = n``).
        num_workers: See the base class.
        pin_memory: See the base class.
        passes_per_epoch: See the base class (1: the paper's loader).
        labelled: training batches are ``(images, labels)`` (class-conditional models) instead of images.
    """

    def __init__(
        self,
        n: int = 256,
        index: int = 0,
        num_heldout: int = 512,
        image_size: int = 8,
        normalization: Normalization = "minus_one_one",
        split_seed: int = 0,
        batch_size: int | None = None,
        max_batch_size: int = 512,
        full_batch: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        passes_per_epoch: int = 1,
        labelled: bool = False,
    ) -> None:
        super().__init__(n, batch_size, max_batch_size, full_batch, num_workers, pin_memory, passes_per_epoch)
        check_normalization(normalization)
        pool = NUM_DIGITS - num_heldout
        if num_heldout < 1 or index < 0 or (index + 1) * n > pool:
            raise ValueError(
                f"Training slice [{index * n}, {(index + 1) * n}) does not fit the {pool} non-held-out "
                f"digits (1797 - num_heldout={num_heldout}): lower n, index or num_heldout."
            )
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the digits are 8x8); got {image_size}.")
        self.labelled = bool(labelled)
        self.index = index
        self.num_heldout = num_heldout
        self.image_size = image_size
        self.normalization: Normalization = normalization
        self.split_seed = split_seed
        self.mean: float | None = None
        self._train_labels: Tensor | None = None
        self._heldout_labels: Tensor | None = None
        self.train_indices: Tensor | None = None
        """Rows of scikit-learn's ``load_digits()`` used for training (set by ``setup()``)."""
        self.heldout_indices: Tensor | None = None
        """Rows of ``load_digits()`` held out (set by ``setup()``)."""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (1, self.image_size, self.image_size)

    def build(self) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
        images, labels = load_digits_unit()
        perm = torch.randperm(NUM_DIGITS, generator=torch.Generator().manual_seed(self.split_seed))
        heldout_idx = perm[NUM_DIGITS - self.num_heldout :]
        train_idx = perm[self.index * self.n : (self.index + 1) * self.n]
        self.train_indices, self.heldout_indices = train_idx, heldout_idx
        if self.image_size != 8:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
            images = images.clamp(0.0, 1.0)
        self._train_labels, self._heldout_labels = labels[train_idx], labels[heldout_idx]
        train, heldout, data_range, self.mean = normalize_unit_images(
            images[train_idx], images[heldout_idx], self.normalization
        )
        return train, heldout, data_range

    def _train_dataset(self) -> Dataset:
        if self.labelled:
            return LabelledTensorDataset(self.train_images(), self.train_labels())
        return super()._train_dataset()

    def train_labels(self) -> Tensor:
        """Digit classes (0..9) of :meth:`train_images`, int64 (n,)."""
        self._require_setup()
        assert self._train_labels is not None
        return self._train_labels

    def heldout_labels(self) -> Tensor:
        """Digit classes (0..9) of :meth:`heldout_images`, int64 (num_heldout,)."""
        self._require_setup()
        assert self._heldout_labels is not None
        return self._heldout_labels

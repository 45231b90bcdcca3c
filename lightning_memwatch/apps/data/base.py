"""Shared machinery of the recipe datamodules: in-memory tensors, the paper's batching, data-range metadata.

Every datamodule here holds two tensors after ``setup()``: the ``n`` training samples and a disjoint held-out
set (the FID ``reference``). Batches are plain tensors (no labels), drawn like the paper's loader: shuffled
each epoch, ``drop_last=False`` (the last batch of a pass is smaller), batch size ``min(max_batch_size, n)``
unless set; one batch is one optimizer step.

Metadata read by :class:`~lightning_memwatch.apps.models.ddpm.DDPM` and meant for MemWatch:

* ``data_range``: ``(low, high)`` that every training image lies in (``None`` for unbounded data);
* ``sample_shape``: shape of one sample, e.g. ``(1, 32, 32)``;
* ``train_images()`` / ``heldout_images()``: the tensors themselves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

Normalization = Literal["center", "minus_one_one"]
_NORMALIZATIONS = ("center", "minus_one_one")


def check_normalization(normalization: str) -> None:
    """Raise unless ``normalization`` is one of ``"center"``, ``"minus_one_one"``."""
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {_NORMALIZATIONS}; got {normalization!r}.")


def normalize_unit_images(
    train: Tensor, heldout: Tensor, normalization: Normalization
) -> tuple[Tensor, Tensor, tuple[float, float], float]:
    """Map [0, 1] images to the training scale; returns ``(train, heldout, data_range, mean)`` (new tensors).

    * ``"center"`` (the paper): subtract the scalar mean of the *training* images from both sets; the data
      then lies in ``(-mean, 1 - mean)``. No division (the paper's ``STANDARDIZE=False``).
    * ``"minus_one_one"``: ``2 x - 1``, in ``(-1, 1)`` (the usual DDPM scale; ``mean`` is reported as 0.5).
    """
    check_normalization(normalization)
    if normalization == "minus_one_one":
        return train * 2.0 - 1.0, heldout * 2.0 - 1.0, (-1.0, 1.0), 0.5
    mean = float(train.double().mean())
    return train - mean, heldout - mean, (-mean, 1.0 - mean), mean


class ImageTensorDataset(Dataset):
    """Rows of one tensor; a list of indices is fetched in one indexing op (``__getitems__``)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Tensor:
        return self.images[index]

    def __getitems__(self, indices: Sequence[int]) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


class LabelledTensorDataset(ImageTensorDataset):
    """Rows of an image tensor with their class labels: items and fetched lists are ``(images, labels)``."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        super().__init__(images)
        self.labels = labels

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        rows = torch.as_tensor(indices, dtype=torch.long)
        return self.images[rows], self.labels[rows]


def keep_batch(batch: Tensor) -> Tensor:
    """Collate function for :class:`ImageTensorDataset`: the batch is already one tensor."""
    return batch


class RepeatedPermutationSampler(Sampler[int]):
    """``passes`` fresh random permutations of ``range(n)`` back to back: several data passes per epoch.

    With a batch size that divides ``n`` the batches are exactly those of ``passes`` shuffled epochs; it only
    saves Lightning's per-epoch overhead when one epoch is one step (small ``n``, full batch).
    """

    def __init__(self, n: int, passes: int, generator: torch.Generator | None = None) -> None:
        self.n = n
        self.passes = passes
        self.generator = generator

    def __len__(self) -> int:
        return self.n * self.passes

    def __iter__(self) -> Iterator[int]:
        for _ in range(self.passes):
            yield from torch.randperm(self.n, generator=self.generator).tolist()


class TensorDataModule(L.LightningDataModule):
    """Base class: subclasses implement :meth:`build` returning ``(train, heldout, data_range)``.

    Args:
        n: Training set size (samples).
        batch_size: Samples per optimizer step; ``None``: ``min(max_batch_size, n)`` (paper: min(512, n)).
        max_batch_size: Cap used when ``batch_size`` is ``None``.
        full_batch: Use ``batch_size = n`` (the paper's full-batch check); overrides the two above.
        num_workers: DataLoader workers (the data is in memory: 0 is usually fastest).
        pin_memory: Pin host memory for GPU copies; ``None``: when CUDA is available.
        passes_per_epoch: Data passes per Lightning epoch (1: the paper's loader). More passes cut
            Lightning's per-epoch overhead (~1-2 ms) when an epoch is a single step (n <= batch size);
            the batches are unchanged when the batch size divides ``n`` (a warning says when it does not).
    """

    def __init__(
        self,
        n: int,
        batch_size: int | None = None,
        max_batch_size: int = 512,
        full_batch: bool = False,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        passes_per_epoch: int = 1,
    ) -> None:
        super().__init__()
        if n < 2:
            raise ValueError(
                f"n must be >= 2 training samples (the memorization ratio needs 2 neighbours); got {n}."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (min(max_batch_size, n)); got {batch_size}.")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}.")
        if passes_per_epoch < 1:
            raise ValueError(f"passes_per_epoch must be >= 1; got {passes_per_epoch}.")
        self.n = n
        self._batch_size = batch_size
        self.max_batch_size = max_batch_size
        self.full_batch = full_batch
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.passes_per_epoch = passes_per_epoch
        self._train: Tensor | None = None
        self._heldout: Tensor | None = None
        self._data_range: tuple[float, float] | None = None

    # ------------------------------------------------------------------ to implement
    def build(self) -> tuple[Tensor, Tensor, tuple[float, float] | None]:
        """Return ``(train (n, ...), heldout (m, ...), data_range or None)``, float32, already normalised."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        train, heldout, data_range = self.build()
        if len(train) != self.n:
            raise RuntimeError(
                f"{type(self).__name__}.build returned {len(train)} training rows, expected n={self.n}."
            )
        self._train = train.float().contiguous()
        self._heldout = heldout.float().contiguous()
        self._data_range = data_range

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.passes_per_epoch > 1:
            if self.n % self.batch_size:
                warnings.warn(
                    f"passes_per_epoch={self.passes_per_epoch} with n={self.n} not a multiple of batch_size="
                    f"{self.batch_size}: some batches straddle two passes (the paper's loader would end each "
                    "pass with a smaller batch). Use passes_per_epoch=1 for the exact loader.",
                    stacklevel=2,
                )
            sampler = RepeatedPermutationSampler(self.n, self.passes_per_epoch)
        return DataLoader(
            self._train_dataset(),
            batch_size=self.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=False,
            collate_fn=keep_batch,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _train_dataset(self) -> Dataset:
        """What the training loader draws from: the training images (subclasses may add labels)."""
        return ImageTensorDataset(self.train_images())

    # ------------------------------------------------------------------ public accessors
    @property
    def batch_size(self) -> int:
        """Samples per step: ``n`` (full batch), else the given size or ``max_batch_size``, capped at n."""
        if self.full_batch:
            return self.n
        if self._batch_size is not None:
            return min(self._batch_size, self.n)  # a DataLoader over n samples never yields more
        return min(self.max_batch_size, self.n)

    def _require_setup(self) -> None:
        if self._train is None:
            raise RuntimeError(
                f"{type(self).__name__} has no data yet: call `.setup()` first (the Trainer does)."
            )

    def train_images(self) -> Tensor:
        """The ``n`` training samples (n, *sample_shape), normalised as trained on."""
        self._require_setup()
        assert self._train is not None
        return self._train

    def heldout_images(self) -> Tensor:
        """Held-out samples never trained on (m, *sample_shape), same normalisation: the FID ``reference``."""
        self._require_setup()
        assert self._heldout is not None
        return self._heldout

    def reference_images(self) -> Tensor:
        """The FID ``reference`` (MemWatch takes it when ``FID(reference=None)``): :meth:`heldout_images`."""
        return self.heldout_images()

    @property
    def data_range(self) -> tuple[float, float] | None:
        """``(low, high)`` of the normalised data (``None`` before setup or for unbounded data)."""
        return self._data_range

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample; ``None`` before setup unless a subclass knows it earlier."""
        return tuple(self._train.shape[1:]) if self._train is not None else None

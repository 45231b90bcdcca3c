"""The one reader of image sources: a tensor, a Dataset or a DataLoader, read as images in dataset order.

Every part of the package that takes images from the user (MemWatch's training images, the FID reference,
the loss-gap probe's training and held-out images) reads them here, by the same rules:

* a tensor ``(N, C, H, W)`` is read as it is (batches are views);
* a Dataset is read in index order; items may be tensors, ``(image, label)`` tuples or dicts with an
  ``"image"`` or ``"pixel_values"`` key (:func:`~lightning_memwatch._checks.images_of_batch`), labels are
  dropped;
* a DataLoader is read through its dataset with a sequential loader and the loader's own ``collate_fn``, so
  shuffling and ``drop_last`` neither reorder nor drop images; only the rows its sampler can draw are read
  (the training rows of a ``SubsetRandomSampler`` split, the positive-weight rows of a
  ``WeightedRandomSampler``), and a sampler whose rows cannot be known without drawing from it raises;
* an iterable Dataset (a stream) is read to its end; a reader that holds the images (the training images, the
  probe's sets) raises past half of the machine's memory (:func:`stream_limit`), which an endless stream
  (``repeat()``, ``itertools.cycle``, as Lightning may train on) reaches, instead of reading it forever.

Pure torch: no Lightning import. The sources are never modified.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from lightning_memwatch import _checks

__all__ = [
    "ImageSource",
    "collect_images",
    "iter_image_batches",
    "num_images",
    "read_batches",
    "sampler_rows",
    "select_rows",
    "sequential_loader",
    "stream_limit",
]

ImageSource = Tensor | Dataset | DataLoader
"""What the package accepts wherever it takes images: a tensor, a map-style or iterable Dataset, a DataLoader."""


def sampler_rows(loader: DataLoader, name: str) -> list[int] | None:
    """Dataset rows the loader's sampler can draw (sorted), or None for all of them.

    Sequential, random and distributed samplers draw every row; ``SubsetRandomSampler`` (and any sampler
    with ``indices``) its indices; ``WeightedRandomSampler`` the rows of positive weight. Other samplers
    (and custom batch samplers) cannot be read without drawing from them: the error asks for the images.
    """
    # torch has no public name for the sampler of an IterableDataset loader (it draws no indices at all)
    from torch.utils.data.dataloader import _InfiniteConstantSampler

    sampler: Any = loader.sampler
    batch_sampler = loader.batch_sampler
    if batch_sampler is not None and type(batch_sampler).__name__ != "BatchSampler":
        sampler = None  # a custom batch sampler: which rows it yields is its own business
    elif batch_sampler is not None:
        sampler = getattr(batch_sampler, "sampler", sampler)
    if isinstance(sampler, (SequentialSampler, RandomSampler, DistributedSampler, _InfiniteConstantSampler)):
        return None
    if isinstance(sampler, SubsetRandomSampler) or (
        sampler is not None and isinstance(getattr(sampler, "indices", None), (list, tuple, range, Tensor))
    ):
        return sorted({int(i) for i in sampler.indices})
    if isinstance(sampler, WeightedRandomSampler):
        weights = torch.as_tensor(sampler.weights)
        return [int(i) for i in torch.nonzero(weights > 0).flatten()]
    what = type(sampler if sampler is not None else batch_sampler).__name__
    raise _checks.config_error(
        f"{name}: the DataLoader draws its rows with a {what}, which cannot be read without drawing from it, "
        "and the dataset may hold rows it never yields (a held-out split would count as training images, and "
        "copies of them as memorized). Pass the images explicitly, as a tensor or Dataset of exactly the rows "
        f"to use: `MemWatch(train_data=...)`, `FID(reference=...)` or `LossGapProbe({name}=...)`."
    )


def _as_loader(source: Dataset | DataLoader, batch_size: int, name: str) -> DataLoader:
    """A sequential loader over the rows of ``source`` (for a DataLoader: those its sampler can draw)."""
    if isinstance(source, DataLoader):
        dataset, collate = source.dataset, source.collate_fn
        rows = sampler_rows(source, name)
        if rows is not None:
            dataset = Subset(dataset, rows)
    else:
        dataset, collate = source, None
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)  # type: ignore[arg-type]


def sequential_loader(source: Dataset | DataLoader, batch_size: int, name: str) -> DataLoader:
    """A sequential loader over the rows of ``source`` in the order :func:`collect_images` reads them (whole
    batches, labels kept): e.g. to read the training labels beside the images."""
    return _as_loader(source, batch_size, name)


def read_batches(
    source: Dataset | DataLoader, batch_size: int, name: str, *, max_bytes: int | None = None
) -> Iterator[Any]:
    """The batches of :func:`sequential_loader` (whole, labels kept). ``max_bytes``: an iterable Dataset that
    yields more bytes raises instead of reading on (a reader that holds what it reads passes
    :func:`stream_limit`): an endless stream (``repeat()``, ``cycle``) has no set of images to read, and reading
    it would never end, or end out of memory."""
    loader = _as_loader(source, batch_size, name)
    if max_bytes is None or not isinstance(loader.dataset, IterableDataset):
        yield from loader
        return
    seen = count = 0
    for batch in loader:
        yield batch
        seen += _batch_bytes(batch)
        count += len(_checks.images_of_batch(batch, f"a batch of {name}"))
        if seen > max_bytes:
            raise _checks.config_error(
                f"{name}: the iterable Dataset yielded {count:,} images ({seen / 2**30:.3g} GiB, past the "
                f"{max_bytes / 2**30:.3g} GiB one read may hold: half of this machine's memory) without ending: an "
                "endless stream (`repeat()`, `itertools.cycle`) has no set of images to read. Pass the finite set "
                f"of images, as a tensor or a map-style Dataset (`MemWatch(train_data=...)`, "
                f"`LossGapProbe({name}=...)`)."
            )


def stream_limit() -> int:
    """Bytes an iterable Dataset may yield to one read: half of the physical memory (2**62 where the system
    does not say): the images read and their concatenation must fit."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (AttributeError, ValueError, OSError):
        return 2**62


def _batch_bytes(batch: object) -> int:
    """Bytes of the tensors of one batch (a tensor, a tuple or list of them, a dict of them)."""
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, Tensor))


def _check_source(source: object, name: str) -> None:
    if not isinstance(source, (Tensor, Dataset, DataLoader)):
        raise _checks.config_type_error(
            f"{name} must be a Tensor, Dataset or DataLoader of images; got {type(source).__name__}."
        )


def iter_image_batches(
    source: ImageSource, batch_size: int, name: str = "images", *, max_bytes: int | None = None
) -> Iterator[Tensor]:
    """Yield the images of ``source`` in batches of exactly ``batch_size`` (the last one may be smaller).

    A tensor is cut into views; a Dataset or DataLoader is read by the rules of this module and its batches
    are re-cut to ``batch_size`` whatever the loader's own batch size. Images are yielded as the source holds
    them (dtype, device); no check of their values is made here.

    Args:
        source: a tensor (N, ...), a Dataset or a DataLoader of images.
        batch_size: images per yielded batch.
        name: what the source is, for error messages (e.g. ``"reference"``).
        max_bytes: an iterable Dataset may yield at most this many bytes (see :func:`read_batches`); None:
            no limit (a reader that keeps nothing, e.g. FID's statistics, may stream any length).

    Raises:
        TypeError: ``source`` is none of the three, or a batch holds no tensor.
        ValueError: a DataLoader whose sampler cannot be read (see :func:`sampler_rows`), or an iterable
            Dataset past ``max_bytes``.
    """
    _check_source(source, name)
    batch_size = _checks.check_int(batch_size, "batch_size", minimum=1, unit="images")
    if isinstance(source, Tensor):
        for start in range(0, len(source), batch_size):
            yield source[start : start + batch_size]
        return
    pending: list[Tensor] = []
    num_pending = 0
    for batch in read_batches(source, batch_size, name, max_bytes=max_bytes):
        images = _checks.images_of_batch(batch, f"a batch of {name}")
        while len(images):
            take = min(batch_size - num_pending, len(images))
            pending.append(images[:take])
            num_pending += take
            images = images[take:]
            if num_pending == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, num_pending = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def collect_images(
    source: ImageSource, name: str = "train_data", batch_size: int = 512, *, min_rows: int = 2
) -> Tensor:
    """All images of a tensor, Dataset or DataLoader as one float tensor, in dataset order, labels dropped.

    Read by the rules of this module (a DataLoader: only the rows its sampler can draw, in dataset order).
    A float tensor comes back as it is (no copy); the source is never modified.

    Args:
        source: the images.
        name: what they are, for error messages.
        batch_size: rows per read of a Dataset or DataLoader (images).
        min_rows: fewer images raise (e.g. 1 for one rank's block of the training rows).

    Raises:
        TypeError: not an image source, or integer images (convert them to floats in your data_range).
        ValueError: fewer than ``min_rows`` images, no image at all, NaN/Inf values, a DataLoader whose
            sampler cannot be read, or an iterable Dataset that yields more than :func:`stream_limit` bytes
            (an endless stream).
    """
    _check_source(source, name)
    if isinstance(source, Tensor):
        images = source.detach()
    else:
        batches = iter_image_batches(source, batch_size, name, max_bytes=stream_limit())
        chunks = [batch.detach() for batch in batches]
        if not chunks:
            raise _checks.config_error(f"{name} is empty: it yielded no images. Pass a source that holds images.")
        images = torch.cat(chunks)
    return _checks.check_batch(images, name, min_rows=min_rows).float()


def num_images(source: ImageSource, name: str = "images") -> int | None:
    """Number of images :func:`iter_image_batches` yields, or None for an iterable Dataset (a stream: even
    one with a ``__len__`` has no rows to pick, and its length is its own claim)."""
    _check_source(source, name)
    if isinstance(source, Tensor):
        return len(source)
    if isinstance(source, DataLoader):
        rows = sampler_rows(source, name)
        if rows is not None:
            return len(rows)
        source = source.dataset
    if isinstance(source, IterableDataset):
        return None
    try:
        return len(source)  # type: ignore[arg-type]
    except TypeError:
        return None


def select_rows(source: ImageSource, rows: range | Sequence[int], name: str = "images") -> ImageSource:
    """The images ``rows`` (positions in the order :func:`collect_images` reads ``source``) as a source that
    reads only those rows: a view of a tensor (a copy for positions that are not a range), a ``Subset`` of a
    Dataset, a sequential loader over a ``Subset`` of a DataLoader's dataset (its sampler's rows, its
    ``collate_fn``). E.g. one rank's block of the training set, or the probe's few images, read without
    reading the rest. Positions that are not a range may repeat and come in any order.

    Raises:
        TypeError: ``source`` is an iterable Dataset (its rows cannot be picked without reading it) or no
            image source.
        ValueError: ``rows`` reaches past the end of ``source``, or a DataLoader whose sampler cannot be read.
    """
    _check_source(source, name)
    total = num_images(source, name)
    if total is None:
        raise _checks.config_type_error(
            f"{name}: an iterable Dataset has no rows to pick without reading it; pass a map-style Dataset, a "
            "DataLoader of one, or a tensor."
        )
    if isinstance(rows, range):
        if rows.step != 1 or rows.start < 0 or rows.stop > total or rows.start > rows.stop:
            raise _checks.config_error(f"{name}: rows {rows} do not lie in the {total} images of the source.")
        if isinstance(source, Tensor):
            return source[rows.start : rows.stop]
    positions = [int(i) for i in rows]
    if any(not 0 <= i < total for i in positions):
        raise _checks.config_error(f"{name}: rows {_shown(positions)} do not lie in the {total} images of the source.")
    if isinstance(source, Tensor):
        return source[torch.as_tensor(positions, dtype=torch.long, device=source.device)]
    if isinstance(source, DataLoader):
        drawn = sampler_rows(source, name)
        picked = positions if drawn is None else [drawn[i] for i in positions]
        return DataLoader(Subset(source.dataset, picked), batch_size=1, shuffle=False, collate_fn=source.collate_fn)
    return Subset(source, positions)


def _shown(positions: list[int]) -> str:
    """The first few positions, for an error message."""
    return str(positions[:8])[:-1] + (", ...]" if len(positions) > 8 else "]")

"""Where MemWatch's training images live across the ranks: read, check, index, and return them by row.

:class:`TrainImages` is the placement of one fit's training images, decided at setup:

* **sharded** (``knn_sharding`` ``"auto"``/``"sharded"`` under DDP with ``torch.distributed`` initialised): each
  rank reads only its contiguous block of the rows (:func:`~lightning_memwatch.sampling.rank_slice`; rank 0 the
  first) and checks it; the data_range checks judge the whole set (every rank's minimum and maximum are
  gathered). The index is a :class:`~lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex`, built
  by every rank (a collective).
* **on rank 0** (one process, ``"rank0"``, or no process group): global rank 0 reads and checks the whole set and
  indexes it; the other ranks read nothing and learn the image shape (or rank 0's error) from rank 0.

A problem found on one rank raises on every rank, so no rank is left waiting in a collective.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_memwatch import _checks
from lightning_memwatch._checks import check_range, check_range_use
from lightning_memwatch.callbacks._trainer import train_loader_of
from lightning_memwatch.evaluator import Evaluator
from lightning_memwatch.images import collect_images, num_images, select_rows
from lightning_memwatch.labels import FoundLabels, read_labelled_images
from lightning_memwatch.metrics.knn_sharded import ShardedNearestNeighbourIndex
from lightning_memwatch.sampling import rank_slice
from lightning_memwatch.value_check import ValueProfile

__all__ = ["ImageSource", "TrainImages", "find_train_data", "shards_index"]

ImageSource = Tensor | Dataset | DataLoader


def find_train_data(trainer: Trainer, train_data: ImageSource | None) -> ImageSource:
    """``train_data`` when given, else the trainer's training loader (labels are dropped when read)."""
    if train_data is not None:
        return train_data
    loader = train_loader_of(trainer)
    if not isinstance(loader, (DataLoader, Dataset, Tensor)):
        raise _checks.config_error(
            "MemWatch found no training data: pass `MemWatch(train_data=...)` (a tensor, Dataset or "
            "DataLoader of the training images) or give the Trainer a train dataloader."
        )
    return loader


def shards_index(trainer: Trainer, knn_sharding: str) -> bool:
    """Whether this fit's index is sharded over the ranks (``knn_sharding`` and the process group)."""
    if knn_sharding == "rank0" or trainer.world_size == 1:
        return False
    if dist.is_available() and dist.is_initialized():
        return True
    if knn_sharding == "sharded":
        raise _checks.config_error(
            f"MemWatch(knn_sharding='sharded') runs on {trainer.world_size} processes without an initialised "
            "torch.distributed process group, which the sharded index needs: use a DDP strategy, or "
            "knn_sharding='rank0'."
        )
    return False


def _small_use_warning(low: float, high: float, data_range: tuple[float, float]) -> None:
    """Warn once (rank 0) when the whole training set spans [low, high], a small part of ``data_range``."""
    message = check_range_use(torch.tensor([low, high]), "train_data", data_range)
    if message is not None:
        rank_zero_warn(f"MemWatch: {message}")


class TrainImages:
    """This rank's share of the training images of one fit and the index over them.

    Build it with :meth:`read` at setup; :meth:`index_input` hands the images to the evaluator once (in
    ``on_fit_start``, where the module is on its device); :meth:`images_at` returns training images by global
    row afterwards (a collective when sharded).

    Attributes:
        source: the training data as given (tensor, Dataset or DataLoader); FID's fallback reference.
        sharded: whether each rank holds a block of the rows (else global rank 0 holds them all).
        image_shape: the shape of one training image.
        block: sharded, when the index does not hold this rank's block of images unchanged (``feature_fn``,
            or duplicates dropped across the shards): the block of images, for the pair grid and the FID train
            floor; else None.
        found_labels: read with ``with_labels``: the labels read beside this rank's images, in the same pass
            (rank 0's whole set, or this rank's block when sharded); else None.
    """

    def __init__(
        self,
        source: ImageSource,
        *,
        sharded: bool,
        images: Tensor | None,
        image_shape: tuple[int, ...],
        found_labels: FoundLabels | None = None,
    ):
        self.source = source
        self.sharded = sharded
        self.image_shape = image_shape
        self.found_labels = found_labels
        self.block: Tensor | None = None
        self._images = images  # this rank's rows until the evaluator indexes them (None where it holds none)

    # -- reading at setup ---------------------------------------------------------------------------------
    @classmethod
    def read(
        cls,
        trainer: Trainer,
        train_data: ImageSource | None,
        *,
        knn_sharding: str,
        data_range: tuple[float, float],
        with_labels: bool = False,
    ) -> TrainImages:
        """Read and check this rank's rows (a collective under several processes: every rank calls it), and with
        ``with_labels`` their labels in the same pass (:attr:`found_labels`)."""
        source = find_train_data(trainer, train_data)
        if shards_index(trainer, knn_sharding):
            block, shape, found = _read_block(trainer, source, data_range, with_labels)
            return cls(source, sharded=True, images=block, image_shape=shape, found_labels=found)
        images, shape, found = _read_on_rank_zero(trainer, source, data_range, with_labels)
        return cls(source, sharded=False, images=images, image_shape=shape, found_labels=found)

    def value_profile(self, trainer: Trainer) -> ValueProfile:
        """The training images' value profile (:mod:`lightning_memwatch.value_check`), the same on every rank:
        the ranks' blocks merged when sharded, else rank 0's, broadcast (a collective under several processes)."""
        if self.sharded:

            def gather(obj: object) -> list[Any]:
                out: list[Any] = [None] * trainer.world_size
                dist.all_gather_object(out, obj)
                return out

            block = self._images if self._images is not None else torch.empty(0, *self.image_shape)
            return ValueProfile.build(block, gather)
        profile = ValueProfile.of(self._images) if self._images is not None else None
        return trainer.strategy.broadcast(profile, src=0) if trainer.world_size > 1 else profile

    @property
    def fid_fallback(self) -> ImageSource:
        """What FID measures against when it has no reference: the images this rank read, else the source."""
        return self._images if self._images is not None and not self.sharded else self.source

    # -- the index ----------------------------------------------------------------------------------------
    def index_input(
        self, trainer: Trainer, *, backend: str, feature_fn: Any
    ) -> Tensor | ShardedNearestNeighbourIndex | None:
        """What this rank's :class:`~lightning_memwatch.Evaluator` indexes, handed over once: rank 0's whole set
        (the evaluator builds the one index), or the sharded index of this rank's block (built here, a
        collective). None where this rank builds no evaluator, or when the images were handed over already."""
        images, self._images = self._images, None  # the evaluator (or `block`) keeps the one copy
        if images is None or not self.sharded:
            return images
        index = ShardedNearestNeighbourIndex(
            images.to(trainer.strategy.root_device),
            backend=backend,  # type: ignore[arg-type]
            feature_fn=feature_fn,
        )
        if feature_fn is not None or index.num_duplicates > 0:
            self.block = images
        return index

    def can_show(self, evaluator: Evaluator) -> bool:
        """Whether :meth:`images_at` can return images (not only features)."""
        return evaluator.can_show_train_images or self.block is not None

    def images_at(self, evaluator: Evaluator, rows: Tensor) -> Tensor:
        """Training images at global ``rows`` (CPU). A collective when sharded: every rank calls it alike."""
        block = self.block
        if block is None:
            return evaluator.train_images(rows)
        # the shards hold features (or dropped duplicates): each rank sends the rows of its block of images
        index = evaluator.index
        assert isinstance(index, ShardedNearestNeighbourIndex)
        flat = rows.reshape(-1).cpu().long()
        mine = ((flat >= index.offset) & (flat < index.offset + len(block))).nonzero().flatten()
        parts: list[Any] = [None] * index.world_size
        dist.all_gather_object(parts, (mine, block[flat[mine] - index.offset].cpu()), group=index.group)
        out = torch.empty(len(flat), *block.shape[1:])
        for positions, images in parts:
            out[positions] = images
        return out.reshape(*rows.shape, *block.shape[1:])

    def first_images(self, evaluator: Evaluator, count: int) -> Tensor:
        """The first ``count`` training images (fewer when the set is smaller), for the FID train floor. A
        collective when sharded."""
        if self.block is None:
            return evaluator.first_train_images(count)
        index = evaluator.index
        total = index.num_train + index.num_duplicates  # type: ignore[attr-defined]
        return self.images_at(evaluator, torch.arange(min(count, total)))


def _read(source: ImageSource, with_labels: bool, *, min_rows: int = 2) -> tuple[Tensor, FoundLabels | None]:
    """The images of ``source``, and with ``with_labels`` their labels, read in one pass."""
    if with_labels:
        return read_labelled_images(source, min_rows=min_rows)
    return collect_images(source, min_rows=min_rows), None


def _read_on_rank_zero(
    trainer: Trainer, source: ImageSource, data_range: tuple[float, float], with_labels: bool
) -> tuple[Tensor | None, tuple[int, ...], FoundLabels | None]:
    """Global rank 0 reads and checks the whole set (with its labels, when asked); the other ranks read nothing
    and get the image shape (or rank 0's error, raised on every rank) from rank 0."""
    images: Tensor | None = None
    found: FoundLabels | None = None
    problem: BaseException | None = None
    if trainer.is_global_zero:
        try:
            images, found = _read(source, with_labels)
            check_range(images, "train_data", data_range)
        except (TypeError, ValueError) as err:
            problem = err
    shape = None if images is None else tuple(images.shape[1:])
    if trainer.world_size > 1:
        report = trainer.strategy.broadcast((None if problem is None else str(problem), shape), src=0)
        if not trainer.is_global_zero and report[0] is not None:
            raise _checks.config_error(f"MemWatch could not read the training images on rank 0: {report[0]}")
        shape = report[1]
    if problem is not None:
        raise problem
    if images is not None:
        _small_use_warning(float(images.min()), float(images.max()), data_range)
    assert shape is not None
    return images, shape, found


def _read_block(
    trainer: Trainer, source: ImageSource, data_range: tuple[float, float], with_labels: bool
) -> tuple[Tensor, tuple[int, ...], FoundLabels | None]:
    """This rank's contiguous block of the training images (rank 0 the first rows; may hold none), read
    without reading the other blocks (with their labels, when asked), and checked against ``data_range``; the
    small-range warning judges the whole set. A collective: a problem on one rank raises on every rank."""
    world, rank = trainer.world_size, trainer.global_rank
    block: Tensor | None = None
    found = FoundLabels(torch.empty(0, dtype=torch.long)) if with_labels else None  # a rank that holds no rows
    problem: BaseException | None = None
    try:
        total = num_images(source, "train_data")
        if total is None:  # an iterable Dataset: its rows cannot be picked without reading them all
            images, every = _read(source, with_labels)
            rows = rank_slice(len(images), rank, world)
            block = images[rows.start : rows.stop].clone()  # the rest is freed
            if every is not None and every.labels is not None:
                found = FoundLabels(every.labels[rows.start : rows.stop].clone())
            elif every is not None:
                found = every
        else:
            rows = rank_slice(total, rank, world)
            if len(rows):
                block, found = _read(select_rows(source, rows, "train_data"), with_labels, min_rows=1)
        if block is not None:
            check_range(block, "train_data", data_range)
    except (TypeError, ValueError) as err:
        problem = err
    reports: list[Any] = [None] * world
    shape = None if block is None else tuple(block.shape[1:])
    span = None if block is None or problem is not None else (float(block.min()), float(block.max()))
    mine = (None if problem is None else str(problem), shape, 0 if block is None else len(block), span)
    dist.all_gather_object(reports, mine)  # every rank enters, whatever it found
    if problem is not None:
        raise problem
    failed = [f"rank {r}: {msg}" for r, (msg, *_) in enumerate(reports) if msg]
    if failed:
        raise _checks.config_error("MemWatch could not read the training images on another rank: " + "; ".join(failed))
    num_rows = sum(n for _, _, n, _ in reports)
    if num_rows < 2:
        raise _checks.config_error(
            f"train_data holds {num_rows} image(s) in all, but the memorization ratio compares the nearest and "
            "second-nearest training images: pass at least 2."
        )
    spans = [s for *_, s in reports if s is not None]
    if trainer.is_global_zero:  # the whole set's span: every block's minimum and maximum
        _small_use_warning(min(lo for lo, _ in spans), max(hi for _, hi in spans), data_range)
    if block is None:
        block = torch.empty(0, *next(s for _, s, _, _ in reports if s is not None))
    return block, tuple(block.shape[1:]), found

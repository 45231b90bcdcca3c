"""Class labels of a class-conditional model: the training labels, and the label each generated sample asks for.

A sampler that accepts ``labels`` (see :mod:`lightning_memwatch.sampling`) is class-conditional. MemWatch then
needs the training images' labels, read here in the order :func:`~lightning_memwatch.images.collect_images`
reads the images (the second tensor of each batch when it holds integers), or given as
``MemWatch(train_labels=...)``, and one label per generated sample:

* default (``labels=None``): the label of sample ``i`` is drawn from the training labels' frequencies with a
  generator seeded by ``(seed, i)`` alone, so sample ``i`` asks for the same class whatever the batch size or
  world size, and at every evaluation;
* ``labels="balanced"``: sample ``i`` asks for class ``classes[i % K]`` (equal counts, within one, per class);
* ``labels=<LongTensor (num_samples,)>``: exactly those classes, each one of the training classes.

Every check runs at setup, so a bad label fails before the first training step. Pure torch: no Lightning import.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_memwatch import _checks
from lightning_memwatch.images import (
    ImageSource,
    collect_images,
    num_images,
    read_batches,
    select_rows,
    sequential_loader,
    stream_limit,
)
from lightning_memwatch.sampling import _seed_for, rank_slice

__all__ = [
    "FoundLabels",
    "LabelsChoice",
    "balanced_labels",
    "check_train_labels",
    "draw_labels",
    "gather_train_labels",
    "labels_key",
    "read_labelled_images",
    "read_train_labels",
    "train_labels_of",
    "sample_labels",
]

LabelsChoice = Tensor | Literal["balanced"] | None
"""What ``MemWatch(labels=...)`` takes: None (drawn from the training frequencies), ``"balanced"``, or a
LongTensor of one class per generated sample."""

_LABEL_KEYS = ("label", "labels", "class_labels", "y")  # dict batches: where their class indices may sit
_READ_BATCH = 512  # rows per read of a Dataset or DataLoader (images)


def _labels_of_batch(batch: object) -> object | None:
    """The second element of a ``(image, label, ...)`` batch, a dict batch's label entry, or None."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, dict):
        return next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    return None


def _tensor_dataset_labels(source: Dataset | DataLoader) -> Tensor | None | Literal[False]:
    """Labels of a TensorDataset (possibly under a Subset or a loader's sampler rows) without reading the images;
    False when ``source`` is not of that kind."""
    loader = sequential_loader(source, 1, "train_data")
    dataset, rows = loader.dataset, None
    if isinstance(dataset, Subset):
        dataset, rows = dataset.dataset, list(dataset.indices)
    if not isinstance(dataset, TensorDataset):
        return False
    if len(dataset.tensors) < 2:
        return None
    labels = dataset.tensors[1]
    return labels if rows is None else labels[torch.as_tensor(rows, dtype=torch.long)]


def read_train_labels(source: ImageSource, name: str = "train_data") -> Tensor | None:
    """The labels of ``source``'s images, in the order :func:`~lightning_memwatch.images.collect_images` reads
    the images, as they are (any dtype: :func:`check_train_labels` judges them); None when its batches hold no
    second tensor (a tensor of images holds no labels).

    Args:
        source: the training images with their labels: a Dataset of ``(image, label)`` items (or dicts with a
            ``"label"`` key) or a DataLoader of one.
        name: what the source is, for error messages.
    """
    if isinstance(source, Tensor):
        return None
    fast = _tensor_dataset_labels(source)
    if fast is not False:
        return fast
    parts: list[Tensor] = []
    for batch in read_batches(source, _READ_BATCH, name, max_bytes=stream_limit()):
        labels = _labels_of_batch(batch)
        if not isinstance(labels, Tensor):
            return None
        parts.append(labels.detach().reshape(-1).cpu())
    return torch.cat(parts) if parts else None


@dataclasses.dataclass(frozen=True)
class FoundLabels:
    """The labels read beside the images in the same pass (:func:`read_labelled_images`): ``labels`` is None
    when the batches held none."""

    labels: Tensor | None


def read_labelled_images(
    source: ImageSource, name: str = "train_data", *, min_rows: int = 2
) -> tuple[Tensor, FoundLabels]:
    """:func:`~lightning_memwatch.images.collect_images` and :func:`read_train_labels` in one pass over
    ``source``: the images, checked as ``collect_images`` checks them, and their labels (a Dataset whose items
    are decoded files is read once, not twice)."""
    if isinstance(source, Tensor):
        return collect_images(source, name, min_rows=min_rows), FoundLabels(None)
    fast = _tensor_dataset_labels(source)
    if fast is not False:  # a TensorDataset's labels cost no read
        return collect_images(source, name, min_rows=min_rows), FoundLabels(fast)
    images: list[Tensor] = []
    labels: list[Tensor] | None = []
    for batch in read_batches(source, _READ_BATCH, name, max_bytes=stream_limit()):
        images.append(_checks.images_of_batch(batch, f"a batch of {name}").detach())
        found = _labels_of_batch(batch)
        if labels is not None and isinstance(found, Tensor):
            labels.append(found.detach().reshape(-1).cpu())
        else:
            labels = None
    if not images:
        return collect_images(source, name, min_rows=min_rows), FoundLabels(None)  # its error names the problem
    whole = collect_images(torch.cat(images), name, min_rows=min_rows)  # the checks of collect_images
    return whole, FoundLabels(torch.cat(labels) if labels else None)


def train_labels_of(
    source: ImageSource,
    given: Tensor | None,
    *,
    sharded: bool,
    rank: int,
    world_size: int,
    broadcast: Callable[[Any, int], Any],
    found: FoundLabels | None = None,
) -> Tensor | None:
    """The checked labels of every training row, the same on every rank, or None when the training data holds
    none (a class-conditional sampler then has no classes to ask for: the caller says so).

    ``given`` (``MemWatch(train_labels=...)``) wins over the loader's. Not sharded: global rank 0 reads and
    checks them and ``broadcast(obj, src)`` hands them (or its error) to the others. Sharded: each rank reads the
    labels of its own block of rows only and every rank gathers all blocks (:func:`gather_train_labels`). Every
    rank calls it; an error raises on every rank. ``found``: the labels this rank read beside its images (rank 0's
    whole set, or this rank's block when sharded), which are then not read again.
    """
    where = "MemWatch(train_labels=...)" if given is not None else "the second tensor of the training batches"
    if sharded:
        total, raw = gather_train_labels(source, rank, world_size, where, read=given is None, found=found)
        raw = given if given is not None else raw
        return None if raw is None else check_train_labels(raw, total if total is not None else len(raw), where)
    report: tuple[str | None, Tensor | None] = (None, None)
    problem: BaseException | None = None
    if rank == 0:
        try:
            if given is not None:
                raw = given
            else:
                raw = found.labels if found is not None else read_train_labels(source)
            total = num_images(source, "train_data")
            if raw is not None:
                report = (None, check_train_labels(raw, total if total is not None else len(raw), where))
        except (TypeError, ValueError) as err:
            problem, report = err, (str(err), None)
    message, labels = broadcast(report, 0) if world_size > 1 else report
    if problem is not None:
        raise problem
    if message is not None:
        raise _checks.config_error(f"MemWatch could not read the training labels on rank 0: {message}")
    return labels


def gather_train_labels(
    source: ImageSource, rank: int, world_size: int, where: str, *, read: bool = True, found: FoundLabels | None = None
) -> tuple[int | None, Tensor | None]:
    """Under a sharded index: ``(number of training rows, all their labels or None)`` on every rank, each rank
    reading the labels of its contiguous block of rows only (the block of images it indexes; ``found``: read
    already, beside them). A collective (``torch.distributed.all_gather_object``): every rank calls it; a problem
    on one rank raises on all. ``read=False``: only count the rows (the labels were given); None when an iterable
    Dataset hides the count.
    """
    import torch.distributed as dist

    problem: str | None = None
    block: Tensor | None = None
    count: int | None = None
    try:
        total = num_images(source, "train_data")
        if read and found is not None:  # read beside this rank's block of images
            block = found.labels
            rows = rank_slice(total or 0, rank, world_size)  # counts the block's rows when the set is sized
        elif total is None and read:  # an iterable Dataset: read every label, keep this rank's block (as its images)
            every = read_train_labels(source)
            rows = rank_slice(0 if every is None else len(every), rank, world_size)
            block = None if every is None else every[rows.start : rows.stop]
        elif total is not None:
            rows = rank_slice(total, rank, world_size)
            if read and len(rows):
                block = read_train_labels(select_rows(source, rows, "train_data"))
            elif read:
                block = torch.empty(0, dtype=torch.long)
        if block is not None:
            count = len(block) if total is None else len(rows)
            block = check_train_labels(block, count, where)
        elif total is not None:
            count = len(rows)
    except (TypeError, ValueError) as err:
        problem = str(err)
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, (problem, block, count))
    failed = [message for message, _, _ in reports if message]
    if failed:
        raise _checks.config_error(failed[0])
    counts = [n for _, _, n in reports]
    num_train = None if any(n is None for n in counts) else sum(counts)
    blocks = [b for _, b, _ in reports]
    labels = None if not read or any(b is None for b in blocks) else torch.cat(blocks)
    return num_train, labels


def check_train_labels(labels: object, num_train: int, where: str) -> Tensor:
    """The training labels as a CPU int64 tensor ``(num_train,)``, after checking they are class indices.

    Raises:
        TypeError: not a tensor, or float values (a regression target or placeholder read as labels).
        ValueError: another length than the training images, more than one dimension, or negative values.
    """
    if not isinstance(labels, Tensor):
        raise _checks.config_type_error(
            f"{where} must be a LongTensor of one class index per training image; got {type(labels).__name__}."
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise _checks.config_type_error(
            f"{where} has dtype {labels.dtype}, not class indices: a float second tensor in the training batches "
            "(a target, a placeholder) is not labels. A class-conditional sampler needs integer labels: return "
            "them as a LongTensor from the dataset, or pass `MemWatch(train_labels=<LongTensor (n,)>)`."
        )
    labels = labels.detach().reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels.detach()
    if labels.ndim != 1 or len(labels) != num_train:
        raise _checks.config_error(
            f"{where} has shape {tuple(labels.shape)}, but there are {num_train} training images: give one class "
            "index per training image, in the order of the training data."
        )
    if len(labels) and int(labels.min()) < 0:
        raise _checks.config_error(f"{where} holds the negative class {int(labels.min())}; classes are >= 0.")
    return labels.to("cpu", torch.int64)


def draw_labels(indices: range, train_labels: Tensor, seed: int) -> Tensor:
    """The class of each sample in ``indices``, drawn from the training labels' frequencies.

    Sample ``i``'s class depends on ``(seed, i)`` and the class counts only: a 63-bit integer mixed from
    ``(seed, i)`` picks training position ``floor(u * n)`` of the labels sorted by class (exact integer
    arithmetic), so class ``k`` comes with probability ``count_k / n``.

    Example:
        >>> train = torch.tensor([0, 0, 0, 1])
        >>> draw_labels(range(2, 4), train, seed=0).tolist() == draw_labels(range(4), train, seed=0)[2:].tolist()
        True
    """
    classes, counts = torch.unique(train_labels, return_counts=True)
    bounds = torch.cumsum(counts, 0).tolist()  # position p < bounds[j] -> classes[j]
    n = int(bounds[-1])
    picks = []
    for i in indices:
        position = (_seed_for(seed, i, 0x1ABE1) * n) >> 63
        picks.append(bisect.bisect_right(bounds, position))
    return classes[torch.as_tensor(picks, dtype=torch.long)] if picks else torch.empty(0, dtype=torch.long)


def balanced_labels(num_samples: int, classes: Sequence[int]) -> Tensor:
    """Sample ``i`` asks for ``classes[i % K]``: equal counts (within one) per class, in a fixed order."""
    table = torch.as_tensor(list(classes), dtype=torch.long)
    return table[torch.arange(num_samples) % len(table)]


def labels_key(choice: LabelsChoice) -> str | None:
    """``MemWatch(labels=...)`` in a stable, compact form for the watch's checkpoint ``state_key``: None,
    ``"balanced"``, or ``"tensor:<length>:<sha1 of the int64 values, 12 hex digits>"`` (the same classes give the
    same key in every process; different classes a different one)."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, Tensor):
        values = choice.detach().to("cpu", torch.long).contiguous().flatten()
        digest = hashlib.sha1(values.numpy().tobytes()).hexdigest()[:12]
        return f"tensor:{values.numel()}:{digest}"
    return type(choice).__name__  # a bad choice: setup refuses it with the fix


def sample_labels(choice: LabelsChoice, train_labels: Tensor, num_samples: int, seed: int) -> Tensor:
    """The class of every generated sample ``0 .. num_samples - 1`` (CPU int64), by ``MemWatch(labels=...)``.

    Args:
        choice: None (drawn from the training frequencies, see :func:`draw_labels`), ``"balanced"``, or a
            LongTensor ``(num_samples,)`` of classes that occur in the training labels.
        train_labels: checked training labels (:func:`check_train_labels`).
        num_samples: generated samples per evaluation (images).
        seed: MemWatch's seed.

    Raises:
        ValueError / TypeError: a bad ``choice``, with the fix.
    """
    classes = sorted(int(c) for c in torch.unique(train_labels))
    if choice is None:
        return draw_labels(range(num_samples), train_labels, seed)
    if isinstance(choice, str):
        if choice != "balanced":
            raise _checks.config_error(
                f"MemWatch(labels={choice!r}): labels must be None (drawn from the training labels), 'balanced' or "
                f"a LongTensor of {num_samples} class indices."
            )
        return balanced_labels(num_samples, classes)
    if not isinstance(choice, Tensor) or choice.is_floating_point() or choice.dtype == torch.bool:
        what = f"dtype {choice.dtype}" if isinstance(choice, Tensor) else type(choice).__name__
        raise _checks.config_type_error(
            f"MemWatch(labels=...) must be None, 'balanced' or a LongTensor of class indices; got {what}."
        )
    if choice.ndim != 1 or len(choice) != num_samples:
        raise _checks.config_error(
            f"MemWatch(labels=...) has shape {tuple(choice.shape)}: give one class per generated sample, "
            f"shape ({num_samples},) (the number of samples drawn per evaluation)."
        )
    unknown = sorted({int(c) for c in choice.tolist()} - set(classes))
    if unknown:
        raise _checks.config_error(
            f"MemWatch(labels=...) asks for class(es) {unknown[:10]} that no training image has; the training "
            f"classes are {classes[:20]}{' ...' if len(classes) > 20 else ''}."
        )
    return choice.detach().to("cpu", torch.int64).clone()

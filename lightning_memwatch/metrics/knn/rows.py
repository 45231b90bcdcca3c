"""Row sources: read access to the training rows as float32 ``(rows, D)``, held in memory or streamed.

A :class:`HeldRows` owns one float32 copy; a :class:`StreamedRows` reads a numpy array (e.g. a memmap from
``np.load(path, mmap_mode="r")``) or a map-style Dataset in blocks and never copies it whole. Both answer
``block(start, stop)`` (the scan) and ``gather(rows)`` (the exact re-ranking).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import check_float_tensor, config_error, config_type_error

__all__ = ["HeldRows", "StreamedRows", "as_row_source", "source_device"]


class HeldRows:
    """Rows held in memory: one float32 ``(n, D)`` tensor, contiguous, owned by the index."""

    held = True

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows
        self.n, self.dim = int(rows.shape[0]), int(rows.shape[1])

    def block(self, start: int, stop: int, device: torch.device) -> Tensor:
        """Rows ``[start, stop)`` (a view, on the rows' device)."""
        return self.rows[start:stop]

    def gather_np(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any shape of int64) as float32, shape ``idx.shape + (D,)``."""
        return self.rows.numpy()[idx]

    def gather(self, idx: Tensor) -> Tensor:
        """Rows ``idx`` (int64 tensor on the rows' device)."""
        return self.rows[idx]


class StreamedRows(HeldRows):
    """Rows of a numpy array (e.g. a memmap) or a map-style Dataset, read in blocks, never copied whole."""

    held = False

    def __init__(self, source: Any, n: int, dim: int) -> None:
        self.source, self.n, self.dim = source, n, dim

    def _read(self, idx: Sequence[int] | slice) -> np.ndarray:
        src = self.source
        if isinstance(src, np.ndarray):
            out = src[idx]
            out = out.reshape(len(out), -1)
            # a private, writable copy: torch.from_numpy warns on (and must never write into) a read-only map
            return np.array(out, dtype=np.float32, order="C", copy=True)
        items = range(self.n)[idx] if isinstance(idx, slice) else idx
        return np.stack([item_image(src[int(i)]).reshape(-1).numpy() for i in items]).astype(np.float32)

    def block(self, start: int, stop: int, device: torch.device) -> Tensor:
        return torch.from_numpy(self._read(slice(start, stop))).to(device)

    def gather_np(self, idx: np.ndarray) -> np.ndarray:
        flat = idx.reshape(-1)
        if isinstance(self.source, np.ndarray) and len(flat) > 1:
            # a memmap reads fastest in row order; undo the sort afterwards
            order = np.argsort(flat, kind="stable")
            rows = np.empty((len(flat), self.dim), dtype=np.float32)
            rows[order] = self._read(flat[order])
        else:
            rows = self._read(flat.tolist()) if len(flat) else np.empty((0, self.dim), np.float32)
        return rows.reshape(*idx.shape, self.dim)

    def gather(self, idx: Tensor) -> Tensor:
        return torch.from_numpy(self.gather_np(idx.cpu().numpy())).to(idx.device)


def source_device(source: HeldRows) -> torch.device:
    """Where ``source.gather`` wants its indices."""
    return source.rows.device if source.held else torch.device("cpu")


def item_image(item: Any) -> Tensor:
    """The image of one Dataset item: the item itself, or the first element of a (image, label, ...) tuple."""
    if isinstance(item, (tuple, list)):
        item = item[0]
    if isinstance(item, np.ndarray):
        item = torch.from_numpy(item)
    return check_float_tensor(item, "train[i]").detach().cpu().to(torch.float32)


def as_row_source(train: Any, name: str) -> tuple[Tensor | None, StreamedRows | None, tuple[int, ...]]:
    """Either a tensor to copy into memory, or a streamed source; with the per-sample shape."""
    if isinstance(train, Tensor):
        return train, None, tuple(train.shape[1:])
    if isinstance(train, np.memmap) or (isinstance(train, np.ndarray) and not train.flags.owndata):
        if train.dtype != np.float32:
            raise config_type_error(
                f"{name} is a memory-mapped array of dtype {train.dtype}; the index streams float32 rows. "
                f"Save the training set as float32 once (`np.save(path, x.astype(np.float32))`) and open it "
                "with `np.load(path, mmap_mode='r')`."
            )
        if train.ndim < 2 or len(train) < 1:
            raise config_error(f"{name} must be batched, (N, D) or (N, C, H, W); got shape {train.shape}.")
        return None, StreamedRows(train, len(train), int(np.prod(train.shape[1:]))), tuple(train.shape[1:])
    if isinstance(train, np.ndarray):
        if not np.issubdtype(train.dtype, np.floating):
            raise config_type_error(f"{name} has dtype {train.dtype}; pass floating-point images (e.g. `x / 255`).")
        return torch.from_numpy(train), None, tuple(train.shape[1:])
    if hasattr(train, "__getitem__") and hasattr(train, "__len__"):
        n = len(train)
        if n < 1:
            raise config_error(f"{name} is an empty Dataset.")
        first = item_image(train[0])
        return None, StreamedRows(train, n, first.numel()), tuple(first.shape)
    raise config_type_error(
        f"{name} must be a torch.Tensor, a numpy array (e.g. `np.load(path, mmap_mode='r')`) or a map-style "
        f"Dataset of images; got {type(train).__name__}."
    )

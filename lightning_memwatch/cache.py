"""Content fingerprints and a small atomic on-disk cache of tensors.

Anything expensive that is computed from data (e.g. the FID reference statistics) is stored under a key that
is a hash of *everything* the result depends on, so that a stale entry can never be read back: change one
input image, the extractor weights or a preprocessing setting and the key changes.

* :class:`RowSetFingerprint` / :func:`fingerprint_tensor`: hash of the multiset of rows of a batch of images
  or vectors (order-independent, batching-independent, sensitive to dtype, shape and every value).
* :func:`fingerprint_file`, :func:`fingerprint_module`: weights files and ``nn.Module`` state dicts.
* :func:`make_key`: hash of a JSON-able mapping of such parts.
* :class:`TensorCache`: ``save(key, tensors)`` writes to a temporary file and renames it with ``os.replace``
  (atomic on POSIX and Windows), so that concurrent writers (e.g. several DDP ranks) and crashes never leave a
  half-written entry behind; ``load(key)`` treats an unreadable entry as a miss.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lightning_memwatch._checks import config_error, config_type_error

__all__ = [
    "CACHE_DIR_ENV",
    "RowSetFingerprint",
    "TensorCache",
    "default_cache_dir",
    "fingerprint_file",
    "fingerprint_module",
    "fingerprint_tensor",
    "make_key",
]

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "LIGHTNING_MEMWATCH_CACHE_DIR"
"""Environment variable that overrides the default cache directory."""

_FILE_CHUNK = 1 << 20  # bytes read at a time when hashing a file


def default_cache_dir() -> Path:
    """Directory used when no ``cache_dir`` is given.

    ``$LIGHTNING_MEMWATCH_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lightning_memwatch``, else
    ``~/.cache/lightning_memwatch``.
    """
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightning_memwatch"


def _row_bytes(x: Tensor) -> np.ndarray:
    """The raw bytes of ``x`` (detached, on CPU, contiguous) as an (N, bytes_per_row) uint8 array."""
    flat = x.detach().to("cpu").contiguous().reshape(len(x), -1)
    return flat.view(torch.uint8).numpy()


class RowSetFingerprint:
    """Incremental, order-independent fingerprint of the rows of one or more batches.

    Each row (one image or vector) is hashed on its own; the digest is a hash of the *sorted* row digests plus
    the dtype, the per-row shape and the row count. Hence the same images give the same fingerprint whatever
    the batching or the order (a shuffled DataLoader still hits the cache), while changing any value, the
    dtype or the shape changes it. Duplicated rows count with their multiplicity.

    Example:
        >>> fp = RowSetFingerprint()
        >>> fp.update(torch.zeros(2, 3)); fp.update(torch.ones(1, 3))
        >>> fp.hexdigest() == fingerprint_tensor(torch.tensor([[1.0] * 3, [0.0] * 3, [0.0] * 3]))
        True
    """

    def __init__(self) -> None:
        self._digests: list[bytes] = []
        self._dtype: torch.dtype | None = None
        self._row_shape: tuple[int, ...] | None = None

    @property
    def num_rows(self) -> int:
        """Rows seen so far."""
        return len(self._digests)

    def update(self, batch: Tensor) -> None:
        """Add the rows of ``batch`` (shape (N, ...)); every batch must share dtype and per-row shape."""
        if not isinstance(batch, Tensor) or batch.ndim < 1:
            raise config_type_error(f"expected a batched tensor of shape (N, ...), got {type(batch).__name__}.")
        row_shape = tuple(batch.shape[1:])
        if self._dtype is None:
            self._dtype, self._row_shape = batch.dtype, row_shape
        elif (batch.dtype, row_shape) != (self._dtype, self._row_shape):
            raise config_error(
                f"all batches must share dtype and per-row shape; got {batch.dtype} {row_shape} after "
                f"{self._dtype} {self._row_shape}. Convert them to one dtype and size first."
            )
        if len(batch) == 0:
            return
        rows = _row_bytes(batch)
        self._digests.extend(hashlib.blake2b(row, digest_size=16).digest() for row in rows)

    def hexdigest(self) -> str:
        """Hex fingerprint (64 characters) of every row added so far."""
        h = hashlib.sha256()
        h.update(f"rowset-v1|{self._dtype}|{self._row_shape}|{len(self._digests)}|".encode())
        for digest in sorted(self._digests):
            h.update(digest)
        return h.hexdigest()


def fingerprint_tensor(x: Tensor) -> str:
    """Order-independent fingerprint of the rows of ``x`` (see :class:`RowSetFingerprint`)."""
    fp = RowSetFingerprint()
    fp.update(x)
    return fp.hexdigest()


def fingerprint_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file's bytes (read in 1 MiB chunks; ~0.2 s for the 91 MB Inception weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_FILE_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_module(module: nn.Module) -> str:
    """Fingerprint of a module's class (module path + qualified name) and of its whole ``state_dict``.

    Parameters and buffers count (names, dtypes, shapes, values); the device does not.
    """
    cls = type(module)
    h = hashlib.sha256(f"module-v1|{cls.__module__}.{cls.__qualname__}|".encode())
    for name, value in module.state_dict().items():
        if isinstance(value, Tensor):
            t = value.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(_row_bytes(t.reshape(1, -1)).tobytes())
        else:  # extra state
            h.update(f"{name}|{value!r}|".encode())
    return h.hexdigest()


def make_key(parts: Mapping[str, object]) -> str:
    """SHA-256 hex digest of a JSON-able mapping (keys sorted), used as a cache key.

    Raises:
        TypeError: if a value is not JSON-serialisable (pass fingerprints, not tensors).
    """
    try:
        text = json.dumps(dict(parts), sort_keys=True, separators=(",", ":"))
    except TypeError as err:
        raise config_type_error(
            f"cache key parts must be JSON-serialisable (str, int, float, lists, dicts): {err}"
        ) from err
    return hashlib.sha256(text.encode()).hexdigest()


class TensorCache:
    """A directory of ``<namespace>-<key>.pt`` files, each a dict of CPU tensors and JSON-able metadata.

    Args:
        directory: where the entries live; created on first write.
        namespace: file-name prefix separating kinds of entries (e.g. ``"fid-ref"``).

    Example:
        >>> import tempfile
        >>> cache = TensorCache(tempfile.mkdtemp(), namespace="demo")
        >>> path = cache.save("k1", {"mu": torch.zeros(3)}, meta={"n": 5})
        >>> entry = cache.load("k1")
        >>> entry["meta"]["n"], entry["tensors"]["mu"].shape
        (5, torch.Size([3]))
    """

    def __init__(self, directory: str | os.PathLike[str], namespace: str = "entry") -> None:
        self.directory = Path(directory).expanduser()
        self.namespace = namespace

    def path(self, key: str) -> Path:
        """File that holds (or would hold) the entry ``key``."""
        return self.directory / f"{self.namespace}-{key}.pt"

    def load(self, key: str) -> dict[str, object] | None:
        """Return ``{"tensors": {...}, "meta": {...}}`` for ``key``, or ``None`` on a miss.

        An unreadable or malformed file is reported with a warning and treated as a miss (it is then
        overwritten by the next :meth:`save`).
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            if not (
                isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("tensors"), dict)
            ):
                raise ValueError("unexpected content")
        except Exception as err:  # noqa: BLE001 - any unreadable entry is a miss, never a crash
            warnings.warn(
                f"Ignoring unreadable cache entry {path} ({err}); it will be recomputed.", stacklevel=2
            )
            return None
        return {"tensors": entry["tensors"], "meta": entry.get("meta", {})}

    def save(self, key: str, tensors: Mapping[str, Tensor], meta: Mapping[str, object] | None = None) -> Path:
        """Write the entry atomically: temporary file in the same directory, fsync, then ``os.replace``.

        Tensors are stored detached on CPU (the caller's tensors are not modified).

        Returns:
            The path of the entry.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.path(key)
        payload = {
            "key": key,
            "tensors": {name: t.detach().to("cpu").clone() for name, t in tensors.items()},
            "meta": dict(meta or {}),
        }
        fd, tmp_name = tempfile.mkstemp(dir=self.directory, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp_name, final)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        log.debug("cache: wrote %s", final)
        return final

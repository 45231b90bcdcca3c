"""Input checks shared by every module: each error names the fix.

Nothing here modifies its input in place; conversions return new tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

IMAGE_KEYS = ("image", "images", "img", "x", "input")


def images_of_batch(batch: object, name: str = "a batch") -> Tensor:
    """Images from a dataset item or loader batch: the tensor itself, the first tensor of a tuple/list, or an
    image-like entry of a dict (keys ``IMAGE_KEYS``, else its first tensor value). Labels are dropped."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in IMAGE_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, Tensor):
                return item
    raise TypeError(
        f"Cannot find images in {name} of type {type(batch).__name__}: yield tensors, (images, labels) tuples, "
        f"or dicts with an 'image' key, or pass the images as one tensor."
    )


def check_float_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` as a floating-point tensor, refusing what would be silently misread.

    Integer tensors are refused (a uint8 image in [0, 255] would be compared with floats in
    another range); the message says how to convert them.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not torch.is_floating_point(x):
        raise TypeError(
            f"{name} has dtype {x.dtype}; floating-point images are required. Convert them with "
            f"`{name}.float()` and rescale to your data_range (e.g. `x.float() / 255` for uint8 images in [0, 1])."
        )
    return x


def check_finite(x: Tensor, name: str) -> None:
    """Raise if ``x`` holds NaN or Inf, with the count of bad entries."""
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):  # one cheap reduction in the common case
        return
    bad = ~torch.isfinite(x)  # the sum may also overflow: look at every entry
    if bool(bad.any()):
        rows = bad.reshape(len(x), -1).any(dim=1) if x.ndim > 0 and len(x) > 0 else bad
        raise ValueError(
            f"{name} contains {int(bad.sum())} NaN/Inf values (in {int(rows.sum())} of {len(x)} rows). "
            "Check the sampler or model for divergence (e.g. a too-large learning rate) before measuring it."
        )


def check_batch(x: object, name: str, *, min_rows: int = 1) -> Tensor:
    """Validate a batch of images or vectors: float, finite, at least ``min_rows`` rows, ndim >= 2."""
    x = check_float_tensor(x, name)
    if x.ndim < 2:
        raise ValueError(
            f"{name} must be batched, with shape (N, D) or (N, C, H, W); got shape {tuple(x.shape)}. "
            f"Add a batch dimension with `{name}.unsqueeze(0)`."
        )
    if len(x) < min_rows:
        raise ValueError(f"{name} must hold at least {min_rows} rows; got {len(x)} (shape {tuple(x.shape)}).")
    check_finite(x, name)
    return x


def check_range(x: Tensor, name: str, data_range: tuple[float, float], *, tolerance: float = 0.05) -> None:
    """Raise if ``x`` lies far outside ``data_range`` (a sign of a wrong scale, e.g. [0, 255] vs [-1, 1])."""
    lo, hi = data_range
    slack = tolerance * (hi - lo)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo - slack or x_max > hi + slack:
        raise ValueError(
            f"{name} spans [{x_min:.3g}, {x_max:.3g}] but data_range is ({lo}, {hi}). Pass the range your "
            "images really use as `data_range=`, or rescale them to it."
        )

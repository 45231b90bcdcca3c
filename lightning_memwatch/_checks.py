"""The one place of argument and input validation: each error names the fix.

Exception policy (every module of the package follows it):

* A bad argument or input *value* raises :class:`ConfigError`, a subclass of both ``ValueError`` and
  Lightning's ``MisconfigurationException``; a bad *type* raises :class:`ConfigTypeError`, a subclass of both
  ``TypeError`` and ``MisconfigurationException``. So ``except ValueError`` / ``except TypeError`` (plain
  PyTorch code) and ``except MisconfigurationException`` (Lightning code, like ``EarlyStopping``'s errors)
  all catch them; one ``except MisconfigurationException`` catches every configuration error.
* Messages name the argument, list the allowed values or range, and show the value received
  (``"mode must be one of 'min', 'max'; got 'mn'."``), and say how to fix it when that is not obvious.
* Errors that are not about the caller's configuration keep their own types: a missing optional dependency
  (``ImportError`` naming the extra), missing Inception weights (``InceptionWeightsNotFoundError``), calling
  things in the wrong order (``RuntimeError``), a missing method on the user's module (``AttributeError``).
* Raise through :func:`config_error` / :func:`config_type_error` or the ``check_*`` helpers below, never a bare
  ``ValueError``/``TypeError`` for a configuration problem.

The error classes and the checks of plain numbers and choices live in :mod:`lightning_memwatch._arguments`,
which imports neither torch nor numpy (the timescale rules of :mod:`lightning_memwatch.detection` use it), and
are re-exported here. The two classes are built on first use (module ``__getattr__``):
``MisconfigurationException`` lives in Lightning, and importing Lightning costs seconds, which the
Lightning-free modules (``metrics/``, ``images.py``, the evaluator) must not pay at import. Lightning is loaded
only when an error is raised or a class is looked up.

Nothing here modifies its input in place; conversions return new tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

# the torch-free part of the policy (error classes, checks of numbers and choices), re-exported from here
from lightning_memwatch._arguments import (  # noqa: F401
    __getattr__,  # noqa: F401 (serves ConfigError / ConfigTypeError lazily, as _arguments does)
    _scalar,
    check_choice,
    check_float,
    check_int,
    config_error,
    config_type_error,
)

if TYPE_CHECKING:
    from lightning_memwatch._arguments import ConfigError, ConfigTypeError  # noqa: F401


IMAGE_KEYS = ("image", "images", "pixel_values", "img", "x", "input")
"""Dict batches: where their images may sit (``pixel_values``: the diffusers and transformers training scripts)."""


def images_of_batch(batch: object, name: str = "a batch") -> Tensor:
    """Images from a dataset item or loader batch: the tensor itself, the first tensor of a tuple/list, or an
    image-like entry of a dict (keys ``IMAGE_KEYS``, else its first floating-point tensor, else its first
    tensor: token ids or class indices before the images are never taken for them). Labels are dropped."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in IMAGE_KEYS:
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        values = list(batch.values())
        batch = [v for v in values if isinstance(v, Tensor) and v.is_floating_point()] or values
    if isinstance(batch, (tuple, list)):
        for item in batch:
            if isinstance(item, Tensor):
                return item
    raise config_type_error(
        f"Cannot find images in {name} of type {type(batch).__name__}: yield tensors, (images, labels) tuples, "
        f"or dicts with an 'image' or 'pixel_values' key, or pass the images as one tensor."
    )


def check_float_tensor(x: object, name: str) -> Tensor:
    """Return ``x`` as a floating-point tensor, refusing what would be silently misread.

    Integer tensors are refused (a uint8 image in [0, 255] would be compared with floats in
    another range); the message says how to convert them.
    """
    if not isinstance(x, Tensor):
        raise config_type_error(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if not torch.is_floating_point(x):
        raise config_type_error(
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
        raise config_error(
            f"{name} contains {int(bad.sum())} NaN/Inf values (in {int(rows.sum())} of {len(x)} rows). "
            "Check the sampler or model for divergence (e.g. a too-large learning rate) before measuring it."
        )


def check_batch(x: object, name: str, *, min_rows: int = 1) -> Tensor:
    """Validate a batch of images or vectors: float, finite, at least ``min_rows`` rows, ndim >= 2."""
    x = check_float_tensor(x, name)
    if x.ndim < 2:
        raise config_error(
            f"{name} must be batched, with shape (N, D) or (N, C, H, W); got shape {tuple(x.shape)}. "
            f"Add a batch dimension with `{name}.unsqueeze(0)`."
        )
    if len(x) < min_rows:
        raise config_error(f"{name} must hold at least {min_rows} rows; got {len(x)} (shape {tuple(x.shape)}).")
    check_finite(x, name)
    return x


SAMPLE_TOLERANCE = 0.05
"""Samples may overshoot data_range by this fraction of its width without a word."""
MOSTLY_OUTSIDE = 0.4
"""Samples with more than this fraction of values outside data_range (beyond the tolerance) raise."""
FAR_OUTSIDE = 0.01
"""Samples with more than this fraction of values over one data_range width outside it raise (diverged or
another scale, e.g. [0, 255])."""
HALF_SPAN_OUTSIDE = 0.1
"""Samples with more than this fraction of values over half a width outside raise (another span, e.g.
[-1, 1] samples for [0, 1] data)."""
SMALL_USE = 0.6
"""Training images spanning less than this fraction of data_range warn at setup."""


def check_sample_range(x: Tensor, name: str, data_range: tuple[float, float]) -> str | None:
    """Check generated samples against ``data_range`` at an evaluation.

    Returns None when they lie in the range (up to :data:`SAMPLE_TOLERANCE` of its width), a warning message
    for a small overshoot, and raises when they are mostly outside, on another span (e.g. [-1, 1] samples for
    [0, 1] data) or diverged (e.g. values near 1e6): f_mem of such samples is 0 whatever the model does.
    """
    lo, hi = data_range
    span = hi - lo
    values = x.detach().float().reshape(-1)
    x_min, x_max = float(values.min()), float(values.max())
    slack = SAMPLE_TOLERANCE * span
    if x_min >= lo - slack and x_max <= hi + slack:
        return None

    def beyond(width: float) -> float:
        return float(((values < lo - width) | (values > hi + width)).float().mean())

    outside, half, far = beyond(slack), beyond(0.5 * span), beyond(span)
    stats = (
        f"{name} span [{x_min:.4g}, {x_max:.4g}] but data_range is ({lo:g}, {hi:g}): {100 * outside:.1f}% of "
        f"their values lie outside it"
    )
    if outside > MOSTLY_OUTSIDE or half > HALF_SPAN_OUTSIDE or far > FAR_OUTSIDE:
        raise config_error(
            f"{stats} ({100 * far:.1f}% by more than the range's width). Nearest-neighbour ratios of such samples "
            "are all near 1, so f_mem would read 0 whatever the model does. Make the sampler return images in "
            f"data_range ({lo:g}, {hi:g}) (e.g. map [-1, 1] to [0, 1] with `(x + 1) / 2`, or clamp), or pass the "
            "range your training images and samples really use as `MemWatch(data_range=...)`; if the model "
            "diverged (a too-large learning rate), fix the training first."
        )
    return f"{stats} (a small overshoot); they are clamped to data_range for FID, and f_mem uses them as they are."


def check_range_use(x: Tensor, name: str, data_range: tuple[float, float]) -> str | None:
    """A warning message when ``x`` spans less than :data:`SMALL_USE` of ``data_range`` (e.g. [0, 1] images
    declared as (-1, 1)), else None."""
    lo, hi = data_range
    x_min, x_max = float(x.min()), float(x.max())
    used = (x_max - x_min) / (hi - lo)
    if used >= SMALL_USE:
        return None
    return (
        f"{name} span [{x_min:.4g}, {x_max:.4g}], only {100 * used:.0f}% of data_range ({lo:g}, {hi:g}). If that "
        "is not the range your images use, pass the real one as `data_range=` (FID maps data_range to pixel "
        "values, and samples are checked against it)."
    )


def check_range(x: Tensor, name: str, data_range: tuple[float, float], *, tolerance: float = 0.05) -> None:
    """Raise if ``x`` lies far outside ``data_range`` (a sign of a wrong scale, e.g. [0, 255] vs [-1, 1])."""
    lo, hi = data_range
    slack = tolerance * (hi - lo)
    x_min, x_max = float(x.min()), float(x.max())
    if x_min < lo - slack or x_max > hi + slack:
        raise config_error(
            f"{name} spans [{x_min:.3g}, {x_max:.3g}] but data_range is ({lo}, {hi}). Pass the range your "
            "images really use as `data_range=`, or rescale them to it."
        )


def check_data_range(data_range: object, name: str = "data_range") -> tuple[float, float]:
    """``(low, high)`` as two finite floats with ``high > low``: the range of the images, e.g. ``(-1.0, 1.0)``."""
    if isinstance(data_range, (str, bytes)) or not isinstance(data_range, (Sequence, Tensor, np.ndarray)):
        raise config_type_error(
            f"{name} must be a pair (low, high) such as (-1.0, 1.0) or (0.0, 1.0); got {type(data_range).__name__} "
            f"{data_range!r}."
        )
    values = list(data_range)
    if len(values) != 2:
        raise config_error(
            f"{name} must be a pair (low, high) such as (-1.0, 1.0); got {len(values)} values {tuple(values)!r}."
        )
    scalars = [_scalar(v) for v in values]
    lo, hi = (float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else v for v in scalars)
    if not all(isinstance(v, float) and math.isfinite(v) for v in (lo, hi)):
        raise config_error(
            f"{name} must be two finite numbers (low, high), the range the images really span, such as "
            f"(-1.0, 1.0); got {tuple(values)!r}."
        )
    if not hi > lo:
        raise config_error(f"{name} must be (low, high) with high > low; got {(lo, hi)}.")
    return lo, hi

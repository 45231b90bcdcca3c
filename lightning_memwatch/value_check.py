"""Do the samples' values sit where the training images' values sit? The check that ``data_range`` cannot make.

A sampler that returns another scale than the training images makes every ratio d1/d2 near 1, so f_mem reads
0 whatever the model does. Scales that leave ``data_range`` ([0, 255], [-1, 1] samples for [0, 1] data,
diverged values) are caught by the range checks of :mod:`lightning_memwatch._checks`. One is not: samples in
[0, 1] (what a diffusers pipeline returns after its post-processing) against training images in [-1, 1] lie
inside the range, in its upper half. This module compares the two value distributions.

The statistic. Let ``c`` be the midpoint of the training images' values (``(min + max) / 2``) and ``tol`` 2% of
their span. A side of ``c`` (below, or above) is *missing* from the samples when

1. at most :data:`NONE` (1%) of the samples have more than 1% of their values on that side (beyond ``tol``),
2. while at most :data:`NONE` of the training images lack values there (every training image, up to 1%, has
   some), and at least :data:`SUBSTANTIAL` (25%) of all training values lie there;
3. and the samples are not a featureless blob: their values spread (1% to 99% quantiles) over at least
   :data:`MIN_SPREAD` (a quarter) of the training values' spread.

Then :func:`check_values` raises, naming both ranges and the fix. The conditions keep the legitimate cases
quiet: samples of an untrained model are noisy and wide (they have values on both sides: condition 1 fails),
a model can collapse onto the bright half of a data set with bright and dark images (some training images have
no dark values: condition 2 fails), a near-constant early output (a blob) fails condition 3; and a data set
that uses a narrow part of ``data_range`` is measured on its own values, not on ``data_range``.

The training side is summarised once as a :class:`ValueProfile` (a histogram and two counts: mergeable, so
under DDP each rank profiles its block and the profiles are summed). Pure torch; no Lightning import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_memwatch._checks import check_sample_range, config_error

__all__ = ["ValueProfile", "check_against_train", "check_values"]

BINS = 200
"""Histogram bins over the training values' range (quantiles to 0.5% of the span)."""
NONE = 0.01
"""At most this share (of samples, or of training images) counts as 'none'."""
SIDE_SHARE = 0.01
"""A sample or training image 'has values' on a side when more than this share of its values lie there."""
SUBSTANTIAL = 0.25
"""A side holding at least this share of all training values must appear in the samples."""
MIN_SPREAD = 0.25
"""Samples spreading less than this fraction of the training values' spread are a blob, never flagged."""
MARGIN = 0.02
"""Values within this fraction of the training span from the midpoint count on neither side."""
_CHUNK = 4096  # rows per pass (bounded memory on large training sets)
_MAX_QUANTILE_VALUES = 1 << 22  # samples' values used for their spread (a strided subset beyond this)


@dataclasses.dataclass(frozen=True)
class ValueProfile:
    """The training images' value distribution, as the sample check needs it.

    Attributes:
        low: smallest training value.
        high: largest training value.
        counts: histogram of the training values over ``[low, high]`` (:data:`BINS` bins).
        num_images: training images profiled.
        images_without_below: training images with at most :data:`SIDE_SHARE` of their values below the
            midpoint (minus the margin).
        images_without_above: the same above the midpoint (plus the margin).
    """

    low: float
    high: float
    counts: tuple[int, ...]
    num_images: int
    images_without_below: int
    images_without_above: int

    @property
    def midpoint(self) -> float:
        """Midpoint of the training values, ``(low + high) / 2``."""
        return 0.5 * (self.low + self.high)

    @property
    def margin(self) -> float:
        return MARGIN * (self.high - self.low)

    @classmethod
    def of(
        cls, images: Tensor, *, value_range: tuple[float, float] | None = None
    ) -> ValueProfile:
        """Profile ``images`` ``(n, ...)`` (not modified; read in chunks of rows).

        Args:
            images: training images (float).
            value_range: ``(low, high)`` of the values of the whole set when ``images`` is one block of it
                (DDP); default the block's own min and max.
        """
        if value_range is None:
            value_range = value_range_of(images)
        low, high = float(value_range[0]), float(value_range[1])
        counts = torch.zeros(BINS, dtype=torch.float64)
        mid, margin = 0.5 * (low + high), MARGIN * (high - low)
        without_below = without_above = 0
        for start in range(0, len(images), _CHUNK):
            chunk = images[start : start + _CHUNK].detach().reshape(min(_CHUNK, len(images) - start), -1).float()
            if high > low:
                clamped = chunk.clamp(low, high)
                counts += torch.histc(clamped, bins=BINS, min=low, max=high).double().cpu()
                below = (chunk < mid - margin).float().mean(dim=1)
                above = (chunk > mid + margin).float().mean(dim=1)
                without_below += int((below <= SIDE_SHARE).sum())
                without_above += int((above <= SIDE_SHARE).sum())
            else:  # constant images: nothing to compare
                counts[0] += chunk.numel()
        return cls(low, high, tuple(int(c) for c in counts.tolist()), len(images), without_below, without_above)

    @classmethod
    def build(cls, images: Tensor, gather: Callable[[object], Sequence[object]] | None = None) -> ValueProfile:
        """Profile the whole training set when each process holds a block of it: ``gather(obj)`` returns every
        process's ``obj`` (e.g. around ``torch.distributed.all_gather_object``); None: ``images`` is the set.
        A collective when ``gather`` is one; a block may be empty."""
        if gather is None:
            return cls.of(images)
        mine = value_range_of(images) if len(images) else None
        ranges = [r for r in gather(mine) if r is not None]
        value_range = (min(r[0] for r in ranges), max(r[1] for r in ranges))  # type: ignore[index]
        return merge([p for p in gather(cls.of(images, value_range=value_range)) if isinstance(p, ValueProfile)])

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of the training values (linear within a bin)."""
        counts = torch.tensor(self.counts, dtype=torch.float64)
        total = float(counts.sum())
        if total == 0 or self.high == self.low:
            return self.low
        cum = torch.cumsum(counts, 0) / total
        k = int(torch.searchsorted(cum, torch.tensor(q, dtype=torch.float64)).clamp(max=BINS - 1))
        before = float(cum[k - 1]) if k > 0 else 0.0
        inside = (q - before) / max(float(cum[k]) - before, 1e-12)
        width = (self.high - self.low) / BINS
        return self.low + width * (k + min(max(inside, 0.0), 1.0))

    def share(self, side: str) -> float:
        """Share of all training values below (``side="below"``) or above the midpoint, beyond the margin."""
        counts = torch.tensor(self.counts, dtype=torch.float64)
        total = float(counts.sum())
        if total == 0 or self.high == self.low:
            return 0.0
        edges = torch.linspace(self.low, self.high, BINS + 1, dtype=torch.float64)
        centres = 0.5 * (edges[1:] + edges[:-1])
        if side == "below":
            mask = centres < self.midpoint - self.margin
        else:
            mask = centres > self.midpoint + self.margin
        return float(counts[mask].sum()) / total


def value_range_of(images: Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``images``' values, read in chunks of rows."""
    low, high = float("inf"), float("-inf")
    for start in range(0, len(images), _CHUNK):
        chunk = images[start : start + _CHUNK]
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return low, high


def merge(profiles: Sequence[ValueProfile]) -> ValueProfile:
    """One profile of the union of the blocks profiled over the same ``value_range``."""
    first = profiles[0]
    if any((p.low, p.high) != (first.low, first.high) for p in profiles):
        raise ValueError("ValueProfile.merge: the profiles were taken over different value ranges.")
    counts = tuple(sum(column) for column in zip(*(p.counts for p in profiles), strict=True))
    return dataclasses.replace(
        first,
        counts=counts,
        num_images=sum(p.num_images for p in profiles),
        images_without_below=sum(p.images_without_below for p in profiles),
        images_without_above=sum(p.images_without_above for p in profiles),
    )


def _spread(values: Tensor) -> tuple[float, float]:
    flat = values.reshape(-1)
    if flat.numel() > _MAX_QUANTILE_VALUES:
        flat = flat[:: -(-flat.numel() // _MAX_QUANTILE_VALUES)]
    q = torch.quantile(flat.double().cpu(), torch.tensor([0.01, 0.99], dtype=torch.float64))
    return float(q[0]), float(q[1])


def missing_side(samples: Tensor, profile: ValueProfile) -> str | None:
    """``"below"`` or ``"above"`` when the samples lack a side of the training midpoint that every training
    image has (see the module notes), else None."""
    if profile.high <= profile.low or len(samples) == 0:
        return None
    flat = samples.detach().reshape(len(samples), -1).float()
    low_q, high_q = _spread(flat)
    train_spread = profile.quantile(0.99) - profile.quantile(0.01)
    if train_spread <= 0 or (high_q - low_q) < MIN_SPREAD * train_spread:
        return None  # a blob: nothing to say
    mid, margin = profile.midpoint, profile.margin
    for side, on_side, without in (
        ("below", flat < mid - margin, profile.images_without_below),
        ("above", flat > mid + margin, profile.images_without_above),
    ):
        samples_with = float((on_side.float().mean(dim=1) > SIDE_SHARE).float().mean())
        if (
            samples_with <= NONE
            and without <= NONE * profile.num_images
            and profile.share(side) >= SUBSTANTIAL
        ):
            return side
    return None


def check_values(samples: Tensor, profile: ValueProfile, name: str) -> None:
    """Raise when the samples occupy another part of the training images' range than every training image
    (the [0, 1]-samples-against-[-1, 1]-data case; see the module notes).

    Args:
        samples: generated samples ``(m, ...)``.
        profile: the training images' :class:`ValueProfile`.
        name: what the samples are, for the message (e.g. ``"MemWatch samples at step 500"``).

    Raises:
        ConfigError: (a ``ValueError``) naming both ranges and the fix.
    """
    side = missing_side(samples, profile)
    if side is None:
        return
    low_q, high_q = _spread(samples.detach().float())
    mid = profile.midpoint
    share = profile.share(side)
    word = "below" if side == "below" else "above"
    guess = ""
    if side == "below" and abs(profile.low + profile.high) <= 0.1 * (profile.high - profile.low):
        guess = (
            " This is what samples in [0, 1] (e.g. a diffusers pipeline's post-processed output) look like "
            "against training images in [-1, 1]: map them back with `x * 2 - 1` (or ask the pipeline for its raw "
            "output)."
        )
    raise config_error(
        f"{name} span [{low_q:.3g}, {high_q:.3g}] (1% to 99% of their values) with none {word} {mid:.3g}, the "
        f"midpoint of the training images' values, while the training images span [{profile.low:.3g}, "
        f"{profile.high:.3g}] with {100 * share:.0f}% of their values {word} it and values there in every image. "
        "The samples are on another scale than the training images, so every ratio d1/d2 would be near 1 and "
        f"f_mem would read 0 whatever the model does.{guess} Make the sampler return images on the training "
        "images' scale (and data_range)."
    )


def check_against_train(generated: Tensor, train: Tensor, name: str = "generated") -> None:
    """The sample checks of MemWatch, for the public functions given the training images as a tensor: the
    range of the training images' values plays ``data_range``, then :func:`check_values`.

    Raises:
        ConfigError: samples mostly outside the training images' range, far outside it (e.g. [0, 255] copies
            of images in [0, 1]), or on another part of it (e.g. [0, 1] copies of images in [-1, 1]).
    """
    if generated.ndim < 1 or len(generated) == 0 or len(train) == 0 or not torch.is_floating_point(generated):
        return
    low, high = value_range_of(train)
    if not high > low:
        return
    check_sample_range(generated, name, (low, high))
    check_values(generated, ValueProfile.of(train, value_range=(low, high)), name)

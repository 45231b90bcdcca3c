"""The loss-gap probe's maths: fixed (x0, t, noise) triples and the train / held-out denoising-loss gap.

No Lightning import: usable from a plain PyTorch loop. The Lightning callback is
:class:`lightning_memwatch.callbacks.probe.LossGapProbe`.

A probe draws ``num_triples`` pairs once: a training image and a held-out image that share the same diffusion
step ``t`` and the same noise. ``t`` is stratified over ``num_bands`` equal-width noise-level bands of
``[1, num_timesteps)`` (the DDPM training range), so every band holds the same number of triples. The model's
per-sample denoising loss on both sets gives

    loss_gap = (L_heldout - L_train) / L_heldout

(0 for a model that treats both sets alike, up to 1 for a model whose training loss is zero; negative when it
fits the held-out images better). Sharing ``t`` and the noise removes their variance from the difference.

For a class-conditional model both images of a pair are of one class (given the training and held-out
labels): the held-out image is drawn among the held-out images of the training image's class, and the loss is
asked for that class (``loss_fn(x0, t, noise, labels)``), so both sets carry the same mix of classes and the
gap measures the fit of the training images, not which classes are easier.

The loss comes from the module through the optional method of the sampler contract::

    def denoising_loss(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        '''Per-sample denoising loss (B,) of clean images x0 (B, ...) noised to step t (int64 (B,)) with noise.'''

plus a ``num_timesteps`` attribute (T; ``t`` lies in ``[1, T)``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_memwatch._checks import config_error, config_type_error
from lightning_memwatch.images import ImageSource, collect_images, num_images, select_rows

__all__ = [
    "LossFn",
    "LossGapReading",
    "ProbeTriples",
    "band_names",
    "draw_probe_triples",
    "measure_loss_gap",
    "probe_period",
]

LossFn = Callable[..., Tensor]
"""``loss_fn(x0, t, noise) -> per-sample loss (B,)``, e.g. ``DDPM.denoising_loss``; triples with labels call
``loss_fn(x0, t, noise, labels)``."""


@dataclasses.dataclass(frozen=True)
class ProbeTriples:
    """The fixed probe set: ``train[i]`` and ``heldout[i]`` share ``t[i]`` and ``noise[i]``.

    Attributes:
        train: training images (M, ...), float32, on the CPU (copies; the training data is never altered).
        heldout: held-out images (M, ...), same shape.
        t: diffusion steps, int64 (M,), in ``[1, num_timesteps)``.
        noise: standard normal noise (M, ...), shaped like ``train``.
        band: noise-level band of each triple, int64 (M,) in ``[0, len(edges) - 1)``.
        edges: band edges in diffusion steps (``num_bands + 1`` ints; band b is ``edges[b] <= t < edges[b+1]``).
        train_indices: rows of the training images used (M,).
        heldout_indices: rows of the held-out images used (M,).
        labels: class of both images of each triple, int64 (M,), for a class-conditional model; else None.
    """

    train: Tensor
    heldout: Tensor
    t: Tensor
    noise: Tensor
    band: Tensor
    edges: tuple[int, ...]
    train_indices: Tensor
    heldout_indices: Tensor
    labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.t)

    @property
    def num_bands(self) -> int:
        """Number of noise-level bands."""
        return len(self.edges) - 1

    def state_dict(self) -> dict[str, object]:
        """Tensors and edges, to rebuild the same triples at resume (:meth:`from_state_dict`)."""
        return {
            "train": self.train,
            "heldout": self.heldout,
            "t": self.t,
            "noise": self.noise,
            "band": self.band,
            "edges": list(self.edges),
            "train_indices": self.train_indices,
            "heldout_indices": self.heldout_indices,
            "labels": self.labels,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> ProbeTriples:
        """Inverse of :meth:`state_dict`."""
        values = dict(state)
        values["edges"] = tuple(int(e) for e in values["edges"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class LossGapReading:
    """One probe reading at optimizer step ``step``.

    Attributes:
        step: optimizer step (``trainer.global_step``) of the reading.
        loss_train: mean denoising loss on the training triples.
        loss_heldout: mean denoising loss on the held-out triples.
        gap: relative gap ``(loss_heldout - loss_train) / loss_heldout``.
        band_gaps: the relative gap per noise-level band, lowest ``t`` first.
        seconds: wall time of the reading on this rank (s).
    """

    step: int
    loss_train: float
    loss_heldout: float
    gap: float
    band_gaps: tuple[float, ...]
    seconds: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-able record."""
        data = dataclasses.asdict(self)
        data["band_gaps"] = list(self.band_gaps)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> LossGapReading:
        """Inverse of :meth:`to_dict`."""
        values = dict(data)
        values["band_gaps"] = tuple(float(v) for v in values["band_gaps"])  # type: ignore[union-attr]
        return cls(**values)  # type: ignore[arg-type]


def band_names(edges: Sequence[int]) -> list[str]:
    """Names of the bands, e.g. ``["t0001-0249", "t0250-0499", ...]`` (inclusive step ranges)."""
    width = max(4, len(str(int(edges[-1]) - 1)))
    return [f"t{int(a):0{width}d}-{int(b) - 1:0{width}d}" for a, b in zip(edges, edges[1:], strict=False)]


def _sized(source: ImageSource, name: str) -> tuple[ImageSource, int]:
    """``source`` and its number of images; an iterable Dataset (no length, no rows to pick) is read whole."""
    count = num_images(source, name)
    if count is None:
        source = collect_images(source, name, min_rows=1)
        count = len(source)
    return source, count


def _read_rows(source: ImageSource, rows: Tensor, name: str) -> Tensor:
    """The images at ``rows`` (positions, repeats allowed) as a float32 CPU copy, checked finite."""
    picked = collect_images(select_rows(source, rows.tolist(), name), name, min_rows=1)
    return picked.to("cpu", torch.float32).clone()


def _rows(count: int, available: int, generator: torch.Generator) -> Tensor:
    """``count`` row indices into ``available`` rows: a random subset, or whole permutations cycled."""
    reps = math.ceil(count / available)
    perms = [torch.randperm(available, generator=generator) for _ in range(reps)]
    return torch.cat(perms)[:count]


def _labels(labels: Tensor, count: int, name: str) -> Tensor:
    """``labels`` as int64 class indices on the CPU, one per image (``count``)."""
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise config_type_error(f"{name} must be a LongTensor of one class index per image; got {labels!r:.80}.")
    labels = labels.detach().reshape(-1).to("cpu", torch.int64)
    if len(labels) != count:
        raise config_error(f"{name} holds {len(labels)} labels for {count} images: give one class per image.")
    return labels


def _same_class_rows(wanted: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
    """For each class in ``wanted`` (M,), a row of ``labels`` of that class: each class's rows in a random order,
    cycled."""
    rows = torch.empty(len(wanted), dtype=torch.long)
    for c in wanted.unique().tolist():
        slots = (wanted == c).nonzero().flatten()
        pool = (labels == c).nonzero().flatten()
        rows[slots] = pool[_rows(len(slots), len(pool), generator)]
    return rows


def draw_probe_triples(
    train: ImageSource,
    heldout: ImageSource,
    *,
    num_triples: int = 256,
    num_timesteps: int = 1000,
    num_bands: int = 4,
    seed: int = 0,
    train_labels: Tensor | None = None,
    heldout_labels: Tensor | None = None,
) -> ProbeTriples:
    """Draw the fixed probe set once (CPU generator seeded by ``seed``: the same triples on every rank and run).

    Only the drawn rows are read (:func:`~lightning_memwatch.images.select_rows`): a training set on disk is
    not loaded whole to take ``num_triples`` of its images (an iterable Dataset, which has no rows to pick, is).

    Args:
        train: training images (n, ...): a tensor, Dataset or DataLoader, read by the rules of
            :mod:`lightning_memwatch.images`; rows are copied, never modified.
        heldout: held-out images (m, ...) of the same image shape, as ``train``.
        num_triples: triples M per set (images); rows are sampled without replacement, cycled when M > n.
        num_timesteps: T of the diffusion; ``t`` is drawn in ``[1, T)``, stratified over the bands.
        num_bands: equal-width noise-level bands of ``[1, T)`` (1 <= num_bands <= T - 1).
        seed: seed of the rows, the steps and the noise.
        train_labels: class of each training image (a class-conditional model; with ``heldout_labels``): each
            training image is paired with a held-out image of its class.
        heldout_labels: class of each held-out image (with ``train_labels``).
    """
    train, num_train = _sized(train, "train_data")
    heldout, num_heldout = _sized(heldout, "heldout_data")
    if num_train < 1 or num_heldout < 1:
        raise config_error(
            f"The loss-gap probe needs training and held-out images; got {num_train} training and "
            f"{num_heldout} held-out images."
        )
    if num_triples < 1:
        raise config_error(f"num_triples must be >= 1 (images); got {num_triples}.")
    if num_timesteps < 2 or not 1 <= num_bands <= num_timesteps - 1:
        raise config_error(
            f"Need num_timesteps >= 2 and 1 <= num_bands <= num_timesteps - 1; got {num_timesteps}, {num_bands}."
        )
    if (train_labels is None) != (heldout_labels is None):
        raise config_error(
            "Pass both train_labels and heldout_labels (a class-conditional model: pairs of one class), or neither."
        )
    # Both row draws start from the same seed, so a held-out set equal to the training set gives the very same
    # triples (a gap of exactly zero, by construction); t and the noise come from a third stream.
    train_rows = _rows(num_triples, num_train, torch.Generator().manual_seed(int(seed)))
    labels = None
    if train_labels is not None and heldout_labels is not None:
        labels = _labels(train_labels, num_train, "train_labels")[train_rows]
        held_labels = _labels(heldout_labels, num_heldout, "heldout_labels")
        missing = sorted(set(labels.tolist()) - set(held_labels.tolist()))
        if missing:
            raise config_error(
                f"The held-out images hold no image of class(es) {missing[:10]} that the probe's training images "
                "have: the probe pairs each training image with a held-out image of its class. Give held-out "
                "images of every training class."
            )
        heldout_rows = _same_class_rows(labels, held_labels, torch.Generator().manual_seed(int(seed)))
    else:
        heldout_rows = _rows(num_triples, num_heldout, torch.Generator().manual_seed(int(seed)))
    gen = torch.Generator().manual_seed(int(seed) + 0x9E3779B1)
    edges = [1 + round(b * (num_timesteps - 1) / num_bands) for b in range(num_bands + 1)]
    band = torch.arange(num_triples) % num_bands
    lo = torch.tensor(edges[:-1])[band]
    width = torch.tensor(edges[1:])[band] - lo
    t = lo + (torch.rand(num_triples, generator=gen, dtype=torch.float64) * width).long().clamp_max(width - 1)
    x_train = _read_rows(train, train_rows, "train_data")
    x_held = _read_rows(heldout, heldout_rows, "heldout_data")
    if tuple(x_train.shape[1:]) != tuple(x_held.shape[1:]):
        raise config_error(
            f"Training images {tuple(x_train.shape[1:])} and held-out images {tuple(x_held.shape[1:])} must have "
            "the same shape."
        )
    noise = torch.randn(x_train.shape, generator=gen)
    return ProbeTriples(
        train=x_train,
        heldout=x_held,
        t=t.long(),
        noise=noise,
        band=band.long(),
        edges=tuple(edges),
        train_indices=train_rows,
        heldout_indices=heldout_rows,
        labels=labels,
    )


def _per_sample(
    loss_fn: LossFn, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None, batch_size: int
) -> Tensor:
    out = []
    for i in range(0, len(x0), batch_size):
        part = slice(i, i + batch_size)
        args = (x0[part], t[part], noise[part]) + (() if labels is None else (labels[part],))
        value = loss_fn(*args)
        if not isinstance(value, Tensor) or value.shape != (len(x0[i : i + batch_size]),):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise config_error(
                "denoising_loss(x0, t, noise) must return the per-sample loss, a tensor of shape (B,) = "
                f"({len(x0[i : i + batch_size])},); got {shape}."
            )
        out.append(value.detach().double().cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def loss_sums(
    loss_fn: LossFn,
    triples: ProbeTriples,
    rows: Sequence[int] | range | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> Tensor:
    """Per-band sums of the losses of ``rows`` of the triples: float64 (3, num_bands) = (train, held-out, count).

    Summing (rather than averaging) lets ranks each take a share of the rows and add their results.
    """
    idx = torch.as_tensor(list(rows) if rows is not None else range(len(triples)), dtype=torch.long)
    sums = torch.zeros(3, triples.num_bands, dtype=torch.float64)
    if len(idx) == 0:
        return sums
    t = triples.t[idx].to(device)
    noise = triples.noise[idx].to(device)
    labels = triples.labels[idx].to(device) if triples.labels is not None else None
    band = triples.band[idx]
    for row, images in ((0, triples.train), (1, triples.heldout)):
        losses = _per_sample(loss_fn, images[idx].to(device), t, noise, labels, batch_size)
        sums[row].index_add_(0, band, losses)
    sums[2].index_add_(0, band, torch.ones(len(idx), dtype=torch.float64))
    return sums


def reading_from_sums(sums: Tensor, step: int, seconds: float = 0.0) -> LossGapReading:
    """Turn (3, num_bands) sums (from :func:`loss_sums`, possibly added over ranks) into a reading."""
    sums = sums.double().cpu()
    count = sums[2].clamp_min(1.0)
    train_b, held_b = sums[0] / count, sums[1] / count
    total = float(sums[2].sum())
    loss_train, loss_held = float(sums[0].sum()) / total, float(sums[1].sum()) / total
    return LossGapReading(
        step=int(step),
        loss_train=loss_train,
        loss_heldout=loss_held,
        gap=_relative_gap(loss_train, loss_held),
        band_gaps=tuple(_relative_gap(float(a), float(b)) for a, b in zip(train_b, held_b, strict=True)),
        seconds=float(seconds),
    )


def _relative_gap(loss_train: float, loss_heldout: float) -> float:
    if loss_heldout == 0.0:
        return 0.0 if loss_train == 0.0 else -math.inf
    return (loss_heldout - loss_train) / loss_heldout


def measure_loss_gap(
    loss_fn: LossFn,
    triples: ProbeTriples,
    step: int = 0,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
) -> LossGapReading:
    """The loss gap of ``loss_fn`` on all triples (one process), under ``torch.no_grad``.

    Example:
        >>> train, heldout = torch.zeros(8, 1, 2, 2), torch.ones(8, 1, 2, 2)
        >>> triples = draw_probe_triples(train, heldout, num_triples=8, num_timesteps=100, num_bands=2)
        >>> fn = lambda x0, t, noise: 1.0 + x0.flatten(1).mean(1)  # loss 1 on training, 2 on held-out images
        >>> measure_loss_gap(fn, triples).gap
        0.5
    """
    import time

    start = time.perf_counter()
    with torch.no_grad():
        sums = loss_sums(loss_fn, triples, device=device, batch_size=batch_size)
    return reading_from_sums(sums, step, time.perf_counter() - start)


def probe_period(num_triples: int, batch_size: int, budget: float = 0.01) -> int:
    """Optimizer steps between two probe readings so that the probe costs at most ``budget`` of training.

    A reading is ``2 * num_triples`` forward passes of one image; a training step on a batch of
    ``batch_size`` images costs at least a forward and a backward pass, counted here as 2 forward passes per
    image (the backward pass alone usually costs more than one). The period is
    ``ceil(2 * num_triples / (2 * batch_size * budget))``. On the demo (``docs/probe.md``) this measured
    0.2% to 0.8% of the training steps' time; the first rule tried, 3 forward passes per image, measured 1.2%
    at batch 512 and was dropped.

    Example:
        >>> probe_period(256, 512)
        50
    """
    if num_triples < 1 or batch_size < 1 or not 0.0 < budget <= 1.0:
        raise config_error(
            f"Need num_triples >= 1, batch_size >= 1 and 0 < budget <= 1; got {num_triples}, {batch_size}, {budget}."
        )
    return max(1, math.ceil(num_triples / (batch_size * budget) - 1e-9))

"""The sampler contract: per-sample seeding, batching, rank splitting and output checks.

A sampler is either the module's own method, ``pl_module.sample(num_samples, generator=None, noise=None)``,
or a ``sample_fn(pl_module, num_samples, generator=None, noise=None)`` given to MemWatch. Both forms may
omit ``noise``, and a class-conditional sampler adds ``labels=None``; MemWatch inspects the signature:

* ``noise`` accepted: MemWatch hands it the initial noise, shape ``(num_samples, *noise_shape)``, where
  row ``i`` is drawn from a generator seeded by ``(seed, i)`` alone. Sample ``i`` is then the same image
  whatever the batch size or the number of DDP ranks (given a deterministic sampler such as DDIM, eta=0).
* ``generator`` accepted (or ``**kwargs``): a ``torch.Generator`` on the module's device seeded by ``(seed,
  first index of the batch)``, for any other randomness (ancestral samplers, or samplers that draw their own
  noise). With the plain form ``sample(num_samples, generator=...)`` results are reproducible from one
  evaluation to the next for a fixed ``sample_batch_size`` and world size. A sampler taking ``noise`` but not
  ``generator`` is called without it; one taking neither is refused with the contract in the message.
* ``labels`` named: the sampler is class-conditional; it gets a LongTensor ``(num_samples,)`` of class indices,
  the class of sample ``i`` fixed by ``(seed, i)`` and the training labels (see :mod:`lightning_memwatch.labels`).
  A sampler serving both kinds of model says which it has: a module's boolean ``conditional`` attribute (for its
  ``sample`` method), or a ``sample_fn``'s ``takes_labels(pl_module)`` method (the adapters).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import check_finite, config_error, config_type_error

__all__ = [
    "Sampler",
    "accepts_generator",
    "accepts_labels",
    "accepts_noise",
    "batch_generator",
    "check_sampler_signature",
    "draw_samples",
    "gather_in_order",
    "per_sample_noise",
    "rank_slice",
    "sampler_of",
]

Sampler = Callable[..., Tensor]


def _seed_for(*words: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python hash seeds)."""
    return int(
        np.random.SeedSequence([int(w) & 0xFFFFFFFF for w in words]).generate_state(2, np.uint64)[0] >> 1
    )


def sampler_of(pl_module: Any, sample_fn: Callable[..., Tensor] | None = None) -> Sampler:
    """The sampler of the contract: ``sample_fn`` bound to the module (``sampler(n, **kw)`` calls
    ``sample_fn(pl_module, n, **kw)``; its signature, less the module, stays visible so ``noise`` is passed only
    when it is accepted), else the module's own ``sample`` method.

    Raises:
        AttributeError: no ``sample_fn`` and no ``sample`` method, with the contract to implement.
    """
    if sample_fn is not None:
        fn = sample_fn

        def call(num_samples: int, **kwargs: Any) -> Tensor:
            return fn(pl_module, num_samples, **kwargs)

        signature = _without_first_parameter(fn)
        takes_labels = getattr(fn, "takes_labels", None)  # adapters: `labels` only for a conditional model
        if signature is not None and callable(takes_labels) and not takes_labels(pl_module):
            signature = signature.replace(parameters=[p for n, p in signature.parameters.items() if n != "labels"])
        call.__signature__ = signature  # type: ignore[attr-defined]
        return call
    sample = getattr(pl_module, "sample", None)
    if not callable(sample):
        raise AttributeError(
            f"{type(pl_module).__name__} has no `sample` method. Add "
            "`def sample(self, num_samples, generator=None, noise=None) -> Tensor` returning (B, C, H, W) "
            "images in data_range, or pass `MemWatch(sample_fn=lambda module, n, generator=None: ...)`."
        )
    return sample


def _without_first_parameter(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return sig.replace(parameters=list(sig.parameters.values())[1:])


def accepts_noise(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes a ``noise`` keyword."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "noise" in params


def accepts_labels(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` names a ``labels`` parameter: a class-conditional sampler (``**kwargs`` does not count,
    so an unconditional sampler is never handed classes it would ignore)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    # a module's `sample` whose module says it is unconditional (e.g. the recipe DDPM's `conditional`)
    conditional = getattr(getattr(fn, "__self__", None), "conditional", None)
    return "labels" in params and (conditional if isinstance(conditional, bool) else True)


def accepts_generator(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes a ``generator`` keyword (or ``**kwargs``), or its signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True  # a builtin or C extension: pass it, as the contract says
    return "generator" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_sampler_signature(sampler: Callable[..., Any], where: str, *, takes_noise: bool) -> bool:
    """Whether to pass ``generator`` to ``sampler``; raise if it can take neither ``generator`` nor ``noise``.

    A sampler taking ``noise`` but no ``generator`` is deterministic given its noise (e.g. DDIM, eta = 0): it is
    called without ``generator``. One taking neither has no way to receive MemWatch's seeds.
    """
    if accepts_generator(sampler):
        return True
    if takes_noise:
        return False
    try:
        shown = f"{where}{inspect.signature(sampler)}"
    except (TypeError, ValueError):
        shown = where
    raise config_type_error(
        f"{shown} takes neither `generator` nor `noise`, so MemWatch cannot seed its samples. The sampler "
        "contract is `sample(num_samples, generator=None, noise=None)` (or `sample_fn(pl_module, num_samples, "
        "generator=None, noise=None)`): accept `generator` (a torch.Generator for all of its randomness) and/or "
        "`noise` (the initial noise), e.g. `def sample(self, num_samples, generator=None): ...`."
    )


def per_sample_noise(
    indices: range, shape: Sequence[int], seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal noise, one row per sample index, row ``i`` determined by ``(seed, i)`` only."""
    rows = []
    gen = torch.Generator()
    for i in indices:
        gen.manual_seed(_seed_for(seed, i, 0x5EED))
        rows.append(torch.randn(tuple(shape), generator=gen))
    if not rows:
        return torch.empty((0, *shape), device=device)
    return torch.stack(rows).to(device)


def batch_generator(seed: int, first_index: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded by ``(seed, first_index)``: extra randomness of one batch."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_seed_for(seed, first_index, 0xBA7C))
    return gen


def rank_slice(num_samples: int, rank: int, world_size: int) -> range:
    """Contiguous share of sample indices for ``rank``; shares differ in length by at most one."""
    per_rank, extra = divmod(num_samples, world_size)
    start = rank * per_rank + min(rank, extra)
    return range(start, start + per_rank + (1 if rank < extra else 0))


def gather_in_order(
    local: Tensor, total: int, world_size: int, all_gather: Callable[[Tensor], Tensor]
) -> Tensor:
    """Every rank's share of ``total`` samples (its :func:`rank_slice`), concatenated in index order.

    A collective: every rank calls it with its own ``local`` share. Shares differ in length by one at most, so
    each is padded to the longest before ``all_gather`` (``(world_size, longest, ...)``, e.g. Lightning's
    ``trainer.strategy.all_gather``) and cut back after.
    """
    if world_size == 1:
        return local
    longest = len(rank_slice(total, 0, world_size))
    padded = torch.zeros((longest, *local.shape[1:]), device=local.device, dtype=local.dtype)
    padded[: len(local)] = local
    gathered = all_gather(padded)  # (world_size, longest, ...)
    return torch.cat([gathered[r, : len(rank_slice(total, r, world_size))] for r in range(world_size)])


def draw_samples(
    sampler: Callable[..., Tensor],
    indices: range,
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    noise_shape: Sequence[int] | None,
    sample_shape: Sequence[int] | None,
    where: str = "pl_module.sample",
    on_batch: Callable[[int], None] | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Call ``sampler(count, generator=..., [noise=...], [labels=...])`` batch by batch over ``indices``; check
    each batch.

    ``labels``, when given, holds the class of every sample index (``labels[i]`` for sample ``i``, e.g. from
    :func:`lightning_memwatch.labels.sample_labels`); each call gets the classes of its batch, on ``device``.

    Returns the samples of ``indices`` in order, on ``device``, float32. ``on_batch(count)``, when given, is
    called after each checked batch with its number of images (progress display).

    Raises:
        ValueError / TypeError: a batch of the wrong count, shape, dtype, or holding NaN/Inf, with the fix.
    """
    use_noise = accepts_noise(sampler) and noise_shape is not None
    use_generator = check_sampler_signature(sampler, where, takes_noise=use_noise)
    out: list[Tensor] = []
    for start in range(indices.start, indices.stop, batch_size):
        chunk = range(start, min(start + batch_size, indices.stop))
        kwargs: dict[str, Any] = {"generator": batch_generator(seed, start, device)} if use_generator else {}
        if use_noise:
            kwargs["noise"] = per_sample_noise(chunk, noise_shape, seed, device)  # type: ignore[arg-type]
        if labels is not None:  # class-conditional: the classes of this batch's sample indices
            kwargs["labels"] = labels[chunk.start : chunk.stop].to(device)
        batch = sampler(len(chunk), **kwargs)
        out.append(check_sampler_output(batch, len(chunk), sample_shape, where).to(device, torch.float32))
        if on_batch is not None:  # progress hook
            on_batch(len(chunk))
    if not out:
        shape = tuple(sample_shape) if sample_shape is not None else (0,)
        return torch.empty((0, *shape), device=device)
    return torch.cat(out)


def check_sampler_output(batch: object, count: int, sample_shape: Sequence[int] | None, where: str) -> Tensor:
    """Validate one sampler batch: a float tensor of ``count`` finite samples shaped like the training images."""
    if not isinstance(batch, Tensor):
        raise config_type_error(
            f"{where} must return a torch.Tensor of shape (B, C, H, W); it returned {type(batch).__name__}."
        )
    if not torch.is_floating_point(batch):
        raise config_type_error(
            f"{where} returned dtype {batch.dtype}; return float images in data_range "
            "(e.g. `x.float()` rescaled), not integers."
        )
    if batch.ndim < 1 or len(batch) != count:
        got = len(batch) if batch.ndim else "a scalar"
        raise config_error(
            f"{where} was asked for {count} samples and returned {got} (shape {tuple(batch.shape)}). "
            "Return exactly `num_samples` samples, stacked along dim 0."
        )
    if sample_shape is not None and tuple(batch.shape[1:]) != tuple(sample_shape):
        raise config_error(
            f"{where} returned samples of shape {tuple(batch.shape[1:])}, but the training images have shape "
            f"{tuple(sample_shape)}. Samples and training data must live in the same space (decode latents "
            "first, or give MemWatch a feature_fn for feature-space comparison)."
        )
    check_finite(batch.detach(), f"Samples from {where}")
    return batch.detach()

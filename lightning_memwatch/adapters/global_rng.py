"""Samplers that draw their own noise from the global RNG (``torch.randn`` inside), made repeatable.

Many samplers (lucidrains' ``GaussianDiffusion.sample``, hand-written loops, pipelines called without a
generator) take no noise and no generator. :class:`GlobalRNGSampler` runs one inside a forked RNG, seeded per
sample (or per batch) from MemWatch's seeds: every evaluation draws the same noise, and the training RNG
(CPU and the module's CUDA device) is exactly as it was before the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_memwatch._checks import config_error, config_type_error
from lightning_memwatch.adapters._seeds import seed_from_generator, seeds_from_noise

__all__ = ["GlobalRNGSampler"]


def _device_of(pl_module: Any) -> torch.device:
    device = getattr(pl_module, "device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


class GlobalRNGSampler:
    """``sample_fn`` around ``fn(pl_module, num_samples) -> Tensor``, a sampler that draws from the global RNG.

    Example:
        >>> from lightning_memwatch.adapters import GlobalRNGSampler
        >>> sample_fn = GlobalRNGSampler(lambda module, n: module.diffusion.sample(batch_size=n))

    Args:
        fn: The sampler, called as ``fn(pl_module, num_samples)``; it returns (B, C, H, W) images in the training
            data's range (map them yourself, or with :func:`~lightning_memwatch.adapters.map_range`).
        per_sample: True: one call per sample, the RNG seeded from that sample's MemWatch noise, so sample ``i``
            is the same image whatever the batch size or the number of ranks (slower: batches of one).
            False: one call per MemWatch batch, seeded from MemWatch's per-batch generator: reproducible from one
            evaluation to the next for a fixed ``sample_batch_size`` and world size.
    """

    def __init__(self, fn: Callable[[Any, int], Tensor], *, per_sample: bool = True) -> None:
        if not callable(fn):
            raise config_type_error(f"fn must be callable as fn(pl_module, num_samples); got {type(fn).__name__}.")
        self.fn = fn
        self.per_sample = per_sample

    def _run(self, pl_module: Any, num_samples: int, seed: int, device: torch.device) -> Tensor:
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(seed)
            return self.fn(pl_module, num_samples)

    def __call__(
        self,
        pl_module: Any,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples with the wrapped sampler, seeded as described above."""
        device = _device_of(pl_module)
        if self.per_sample and noise is not None:
            if len(noise) != num_samples:
                raise config_error(f"noise has {len(noise)} rows but num_samples={num_samples}; pass matching sizes.")
            return torch.cat([self._run(pl_module, 1, s, device) for s in seeds_from_noise(noise)])
        return self._run(pl_module, num_samples, seed_from_generator(generator), device)

"""Ready-made ``sample_fn`` adapters for samplers users already have: pass one as ``MemWatch(sample_fn=...)``.

* :class:`DiffusersSampler`: a diffusers ``UNet2DModel``-like denoiser driven by any diffusers scheduler.
* :class:`PipelineSampler`: a diffusers ``DiffusionPipeline``.
* :class:`LucidrainsSampler`: lucidrains' ``GaussianDiffusion`` (denoising-diffusion-pytorch).
* :class:`GlobalRNGSampler`: any sampler that draws its own noise from the global RNG.

The diffusers and lucidrains adapters also provide the loss-gap probe's loss (the optional part of the sampler
contract, ``denoising_loss(pl_module, x0, t, noise)`` and ``num_timesteps(pl_module)``): their model's training
loss, which :class:`~lightning_memwatch.LossGapProbe` reads from the adapter MemWatch samples with.

Each adapter lives in its own module and is imported on first use: ``import lightning_memwatch`` (or this
package) imports neither diffusers nor denoising-diffusion-pytorch. Install them with the ``diffusers`` or
``lucidrains`` extra (``pip install "lightning-memwatch[diffusers]"``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "DiffusersSampler": "lightning_memwatch.adapters.diffusers",
    "PipelineSampler": "lightning_memwatch.adapters.diffusers",
    "LucidrainsSampler": "lightning_memwatch.adapters.lucidrains",
    "GlobalRNGSampler": "lightning_memwatch.adapters.global_rng",
    "map_range": "lightning_memwatch.adapters._range",
}

__all__ = ["DiffusersSampler", "GlobalRNGSampler", "LucidrainsSampler", "PipelineSampler", "map_range"]

if TYPE_CHECKING:  # pragma: no cover
    from lightning_memwatch.adapters._range import map_range
    from lightning_memwatch.adapters.diffusers import DiffusersSampler, PipelineSampler
    from lightning_memwatch.adapters.global_rng import GlobalRNGSampler
    from lightning_memwatch.adapters.lucidrains import LucidrainsSampler


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_memwatch.adapters' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

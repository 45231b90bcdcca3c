"""diffusers adapters: a ``UNet2DModel``-like denoiser with any diffusers scheduler, and a ``DiffusionPipeline``.

diffusers is imported when a sampler first runs, never by ``import lightning_memwatch``.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_memwatch._checks import config_error, config_type_error
from lightning_memwatch.adapters._range import (
    ModuleRef,
    Range,
    check_range_arg,
    map_range,
    module_device,
    optional_import,
    resolve_module,
)
from lightning_memwatch.adapters._seeds import seeds_from_noise

__all__ = ["DiffusersSampler", "PipelineSampler"]


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _prediction(out: Any) -> Tensor:
    """The tensor of a denoiser's output: diffusers' ``UNet2DOutput.sample``, a tuple's first item, a tensor."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise config_type_error(
        f"The denoiser returned {type(out).__name__}; DiffusersSampler needs a tensor, a tuple starting with one, "
        "or an object with a `.sample` tensor (diffusers' UNet2DOutput)."
    )


class DiffusersSampler:
    """``sample_fn`` that runs a diffusers scheduler's reverse loop with a ``UNet2DModel``-like denoiser.

    The initial noise is MemWatch's per-sample noise (scaled by the scheduler's ``init_noise_sigma``), so
    sample ``i`` is the same image whatever the batch size or the number of ranks for deterministic schedulers
    (``DDIMScheduler`` with ``eta=0``); any other randomness of ``scheduler.step`` comes from MemWatch's
    per-batch generator. The scheduler is copied at every call: the one given (and its timesteps) is never
    modified, so it may be the scheduler used for training.

    Example:
        >>> from diffusers import DDIMScheduler
        >>> from lightning_memwatch.adapters import DiffusersSampler
        >>> sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), num_inference_steps=50)

    Args:
        scheduler: Any diffusers scheduler (``DDIMScheduler``, ``DDPMScheduler``, ``DPMSolverMultistepScheduler``
            ...), configured like the one used for training (``num_train_timesteps``, ``prediction_type``).
        num_inference_steps: Denoising steps per sample (steps).
        unet: Where the denoiser is, looked up on the LightningModule at every call (so the weights MemWatch
            evaluates are the ones used): an attribute name (``"unet"``, ``"model.unet"``), a function
            ``fn(pl_module) -> denoiser``, or None when the LightningModule itself is the denoiser. It is called
            as ``denoiser(x_t, t)`` with ``t`` of shape (B,) and returns a tensor or an object with ``.sample``.
        model_range: ``(low, high)`` of the images the denoiser was trained on. diffusers' convention is
            ``(-1, 1)``.
        data_range: ``(low, high)`` of the training images MemWatch compares with; samples are mapped
            affinely from ``model_range`` to it. None: the same as ``model_range`` (no mapping). Give the
            range you pass to MemWatch: a mismatch makes every sample look novel, which MemWatch's range check
            reports at the first evaluation.
        clamp: Clamp samples to ``model_range`` before mapping (as diffusers' pipelines do).
        step_kwargs: Extra keyword arguments of ``scheduler.step``, e.g. ``{"eta": 0.0}`` for DDIM.
        sample_shape: ``(C, H, W)`` of one sample when MemWatch passes no noise; default the denoiser's
            ``config.in_channels`` and ``config.sample_size``.
    """

    def __init__(
        self,
        scheduler: Any,
        num_inference_steps: int = 50,
        *,
        unet: ModuleRef = "unet",
        model_range: Sequence[float] = (-1.0, 1.0),
        data_range: Sequence[float] | None = None,
        clamp: bool = True,
        step_kwargs: dict[str, Any] | None = None,
        sample_shape: Sequence[int] | None = None,
    ) -> None:
        for attr in ("set_timesteps", "step", "timesteps"):
            if not hasattr(scheduler, attr):
                raise config_type_error(
                    f"scheduler must be a diffusers scheduler (with `set_timesteps`, `step`, `timesteps`); "
                    f"{type(scheduler).__name__} has no `{attr}`."
                )
        if num_inference_steps < 1:
            raise config_error(f"num_inference_steps must be >= 1; got {num_inference_steps}.")
        self.scheduler = scheduler
        self.num_inference_steps = int(num_inference_steps)
        self.unet = unet
        self.model_range: Range = check_range_arg(model_range, "model_range")
        self.data_range: Range = (
            self.model_range if data_range is None else check_range_arg(data_range, "data_range")
        )
        self.clamp = clamp
        self.step_kwargs = dict(step_kwargs or {})
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None

    def _initial_noise(self, net: Any, num_samples: int, generator: torch.Generator | None, device: Any) -> Tensor:
        shape = self.sample_shape
        if shape is None:
            config = getattr(net, "config", None)
            size = getattr(config, "sample_size", None)
            channels = getattr(config, "in_channels", None)
            if size is None or channels is None:
                raise config_error(
                    "DiffusersSampler got no noise and cannot tell the sample shape: pass "
                    "DiffusersSampler(sample_shape=(C, H, W)) or use it through MemWatch, which passes noise."
                )
            hw = (size, size) if isinstance(size, int) else tuple(size)
            shape = (int(channels), *hw)
        gen_device = generator.device if generator is not None else device
        return torch.randn((num_samples, *shape), generator=generator, device=gen_device).to(device)

    def __call__(
        self,
        pl_module: Any,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples (B, C, H, W) in ``data_range``, float32, on the denoiser's device."""
        net = resolve_module(pl_module, self.unet, "unet")
        device = module_device(net, pl_module)
        if noise is None:
            noise = self._initial_noise(net, num_samples, generator, device)
        elif len(noise) != num_samples:
            raise config_error(f"noise has {len(noise)} rows but num_samples={num_samples}; pass matching sizes.")
        dtype = next(net.parameters()).dtype if hasattr(net, "parameters") else torch.float32
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        kwargs = dict(self.step_kwargs)
        if generator is not None and _accepts(scheduler.step, "generator"):
            kwargs["generator"] = generator
        x = noise.to(device=device, dtype=torch.float32) * float(getattr(scheduler, "init_noise_sigma", 1.0))
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                t_batch = t.to(device).reshape(1).expand(len(x))
                eps = _prediction(net(model_in.to(dtype), t_batch)).float()
                x = scheduler.step(eps, t, x, return_dict=True, **kwargs).prev_sample
        return map_range(x.float(), self.model_range, self.data_range, clamp=self.clamp)


class PipelineSampler:
    """``sample_fn`` that calls a diffusers ``DiffusionPipeline`` (e.g. ``DDIMPipeline``) and returns tensors.

    The pipeline is called as ``pipeline(batch_size=n, generator=..., num_inference_steps=..., output_type="np")``
    with ``call_kwargs`` added. Per-sample noise: a pipeline that takes ``latents`` gets MemWatch's per-sample
    noise; one that does not (``DDPMPipeline``, ``DDIMPipeline``) gets one generator per sample, seeded from
    that sample's noise, so sample ``i`` is the same image whatever the batch size or the number of ranks
    (on one machine). Its images, in [0, 1] as diffusers' ``"np"`` output, are mapped to ``data_range``.

    Build the pipeline around the module's own denoiser (``DDIMPipeline(unet=module.unet, scheduler=...)``
    shares it, copies nothing) so it samples the weights being trained, or pass the attribute that holds it.

    Args:
        pipeline: A ``DiffusionPipeline``, an attribute name of the LightningModule holding one, or a function
            ``fn(pl_module) -> pipeline`` (looked up at every call).
        num_inference_steps: Denoising steps per sample (steps).
        data_range: ``(low, high)`` of the training images MemWatch compares with.
        output_range: ``(low, high)`` of the pipeline's ``"np"`` output: (0, 1) for diffusers' pipelines.
        call_kwargs: Extra keyword arguments of the pipeline call (``{"eta": 0.0}`` ...).
    """

    def __init__(
        self,
        pipeline: Any,
        num_inference_steps: int = 50,
        *,
        data_range: Sequence[float] = (-1.0, 1.0),
        output_range: Sequence[float] = (0.0, 1.0),
        call_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not callable(pipeline) and not isinstance(pipeline, str):
            raise config_type_error(
                f"pipeline must be a diffusers DiffusionPipeline, an attribute name or a function; got "
                f"{type(pipeline).__name__}."
            )
        if num_inference_steps < 1:
            raise config_error(f"num_inference_steps must be >= 1; got {num_inference_steps}.")
        self.pipeline = pipeline
        self.num_inference_steps = int(num_inference_steps)
        self.data_range: Range = check_range_arg(data_range, "data_range")
        self.output_range: Range = check_range_arg(output_range, "output_range")
        self.call_kwargs = dict(call_kwargs or {})

    def _pipeline(self, pl_module: Any) -> Any:
        diffusers = optional_import("diffusers", "diffusers")
        if isinstance(self.pipeline, diffusers.DiffusionPipeline):
            return self.pipeline
        pipe = resolve_module(pl_module, self.pipeline, "pipeline")
        if not isinstance(pipe, diffusers.DiffusionPipeline):
            raise config_type_error(f"PipelineSampler needs a diffusers DiffusionPipeline; got {type(pipe).__name__}.")
        return pipe

    def __call__(
        self,
        pl_module: Any,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples (B, C, H, W) in ``data_range``, float32, on the pipeline's device."""
        pipe = self._pipeline(pl_module)
        pipe.set_progress_bar_config(disable=True)
        device = pipe.device
        kwargs: dict[str, Any] = {
            "batch_size": num_samples,
            "num_inference_steps": self.num_inference_steps,
            "output_type": "np",
            **self.call_kwargs,
        }
        if noise is not None and _accepts(pipe.__call__, "latents"):
            kwargs["latents"] = noise.to(device)
            if generator is not None:
                kwargs["generator"] = generator
        elif noise is not None:
            gen_device = generator.device if generator is not None else device
            kwargs["generator"] = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds_from_noise(noise)]
        elif generator is not None:
            kwargs["generator"] = generator
        with torch.no_grad():
            out = pipe(**kwargs)
        images = out.images if hasattr(out, "images") else out[0]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW
        elif isinstance(images, Tensor):
            pass
        else:
            raise config_type_error(
                f"The pipeline returned {type(images).__name__} images; PipelineSampler needs output_type='np' "
                "support (numpy NHWC) or tensors."
            )
        return map_range(images.float().to(device), self.output_range, self.data_range)

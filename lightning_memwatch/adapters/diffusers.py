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


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""diffusers' ``prediction_type`` values whose training loss the adapters compute."""


def _loss_scheduler_timesteps(scheduler: Any, where: str) -> int:
    """``num_train_timesteps`` of a scheduler the training loss can use, or an error naming what is missing."""
    config = getattr(scheduler, "config", None)
    steps = getattr(config, "num_train_timesteps", None)
    prediction = getattr(config, "prediction_type", None)
    if not callable(getattr(scheduler, "add_noise", None)) or steps is None or prediction is None:
        raise config_type_error(
            f"{where}.denoising_loss needs a DDPM-style diffusers scheduler (`add_noise`, `config.num_train_timesteps`"
            f", `config.prediction_type`, e.g. DDPMScheduler or DDIMScheduler); {type(scheduler).__name__} lacks "
            "one of them. Give the scheduler you train with, or pass `LossGapProbe(loss_fn=...)`."
        )
    if prediction not in PREDICTION_TYPES:
        raise config_error(
            f"{where}.denoising_loss supports prediction_type in {PREDICTION_TYPES}; the scheduler has "
            f"{prediction!r}. Pass `LossGapProbe(loss_fn=...)` for another objective."
        )
    if prediction == "v_prediction" and not callable(getattr(scheduler, "get_velocity", None)):
        raise config_type_error(f"{type(scheduler).__name__} has no `get_velocity`, which v_prediction's loss needs.")
    return int(steps)


def _training_loss(
    net: Any, scheduler: Any, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None = None
) -> Tensor:
    """Per-sample MSE (B,) of the denoiser's prediction against the target of ``scheduler``'s prediction_type.

    ``x0`` is in the denoiser's range; ``t`` are integer training timesteps in ``[0, num_train_timesteps)``;
    ``labels`` (B,), a class-conditional denoiser's ``class_labels``. This is the loss of diffusers' training
    examples (``F.mse_loss(pred, target)``), averaged over pixels but not over the batch, unweighted.
    """
    dtype = next(net.parameters()).dtype if hasattr(net, "parameters") else torch.float32
    x_t = scheduler.add_noise(x0, noise, t)
    extra = {} if labels is None else {"class_labels": labels.to(device=x0.device, dtype=torch.long)}
    pred = _prediction(net(x_t.to(dtype), t, **extra)).float()
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        target = noise
    elif prediction == "sample":
        target = x0
    else:
        target = scheduler.get_velocity(x0, noise, t)
    return (pred - target.float()).pow(2).flatten(1).mean(1)


def _loss_inputs(x0: Tensor, t: Tensor, noise: Tensor, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    if x0.shape != noise.shape or t.shape != (len(x0),):
        raise config_error(
            f"denoising_loss needs x0 (B, ...), t (B,) and noise shaped like x0; got {tuple(x0.shape)}, "
            f"{tuple(t.shape)}, {tuple(noise.shape)}."
        )
    return (
        x0.to(device=device, dtype=torch.float32),
        t.to(device=device, dtype=torch.long),
        noise.to(device=device, dtype=torch.float32),
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

    Class-conditional denoisers (a ``UNet2DModel`` built with ``num_class_embeds`` or a ``class_embed_type``)
    get MemWatch's per-sample classes as ``class_labels`` (:meth:`takes_labels` tells MemWatch to pass them).
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
        self.data_range: Range = self.model_range if data_range is None else check_range_arg(data_range, "data_range")
        self.clamp = clamp
        self.step_kwargs = dict(step_kwargs or {})
        self.sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None

    def takes_labels(self, pl_module: Any) -> bool:
        """Whether the denoiser is class-conditional: its config has ``num_class_embeds`` or ``class_embed_type``."""
        config = getattr(resolve_module(pl_module, self.unet, "unet"), "config", None)
        return any(getattr(config, key, None) is not None for key in ("num_class_embeds", "class_embed_type"))

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
        labels: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples (B, C, H, W) in ``data_range``, float32, on the denoiser's device;
        ``labels`` (B,): the classes of a class-conditional denoiser, passed as its ``class_labels``."""
        net = resolve_module(pl_module, self.unet, "unet")
        device = module_device(net, pl_module)
        extra: dict[str, Any] = {}
        if labels is not None:
            if labels.shape != (num_samples,):
                raise config_error(f"labels must have shape ({num_samples},); got {tuple(labels.shape)}.")
            extra["class_labels"] = labels.to(device=device, dtype=torch.long)
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
                eps = _prediction(net(model_in.to(dtype), t_batch, **extra)).float()
                x = scheduler.step(eps, t, x, return_dict=True, **kwargs).prev_sample
        return map_range(x.float(), self.model_range, self.data_range, clamp=self.clamp)

    # -- the loss-gap probe's loss (optional part of the sampler contract) -----------------------------------
    def num_timesteps(self, pl_module: Any = None) -> int:
        """T of the training diffusion, the scheduler's ``num_train_timesteps``; checks the loss can be computed."""
        return _loss_scheduler_timesteps(self.scheduler, type(self).__name__)

    def denoising_loss(
        self, pl_module: Any, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Per-sample training loss (B,) of the denoiser on ``x0`` noised to timesteps ``t`` with ``noise``.

        The objective of the scheduler's ``prediction_type`` as diffusers' training examples write it:
        ``x_t = scheduler.add_noise(x0, noise, t)``, then the MSE of ``unet(x_t, t)`` against ``noise``
        (``"epsilon"``), ``scheduler.get_velocity(x0, noise, t)`` (``"v_prediction"``) or ``x0``
        (``"sample"``), averaged over pixels. Used by :class:`~lightning_memwatch.LossGapProbe`; gradients
        and train/eval mode follow the caller.

        Args:
            pl_module: The LightningModule holding the denoiser (found as for sampling).
            x0: Clean images (B, C, H, W) in ``data_range``; mapped to ``model_range`` as sampling maps back.
            t: Integer timesteps (B,) in ``[0, num_train_timesteps)``.
            noise: Standard normal noise shaped like ``x0``.
            labels: Classes (B,) of a class-conditional denoiser, passed as its ``class_labels``.
        """
        _loss_scheduler_timesteps(self.scheduler, type(self).__name__)
        net = resolve_module(pl_module, self.unet, "unet")
        x0, t, noise = _loss_inputs(x0, t, noise, module_device(net, pl_module))
        x0 = map_range(x0, self.data_range, self.model_range)
        return _training_loss(net, self.scheduler, x0, t, noise, labels)


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
        model_range: ``(low, high)`` of the images the pipeline's ``unet`` works in, (-1, 1) in diffusers'
            pixel pipelines; used only by :meth:`denoising_loss`.
    """

    def __init__(
        self,
        pipeline: Any,
        num_inference_steps: int = 50,
        *,
        data_range: Sequence[float] = (-1.0, 1.0),
        output_range: Sequence[float] = (0.0, 1.0),
        call_kwargs: dict[str, Any] | None = None,
        model_range: Sequence[float] = (-1.0, 1.0),
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
        self.model_range: Range = check_range_arg(model_range, "model_range")

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

    # -- the loss-gap probe's loss (optional part of the sampler contract) -----------------------------------
    def _unet_and_scheduler(self, pl_module: Any) -> tuple[Any, Any]:
        pipe = self._pipeline(pl_module)
        components = getattr(pipe, "components", {})
        unet, scheduler = components.get("unet"), components.get("scheduler")
        latent = [name for name in ("vae", "vqvae") if components.get(name) is not None]
        if unet is None or scheduler is None or latent:
            why = f"it has a `{latent[0]}` (its UNet works on latents)" if latent else "it has no `unet` or `scheduler`"
            raise config_type_error(
                f"PipelineSampler.denoising_loss needs a pixel-space pipeline with a `unet` and a `scheduler` "
                f"(DDPMPipeline, DDIMPipeline); {type(pipe).__name__}: {why}. Pass `LossGapProbe(loss_fn=...)`."
            )
        return unet, scheduler

    def num_timesteps(self, pl_module: Any) -> int:
        """T of the training diffusion: the pipeline scheduler's ``num_train_timesteps`` (checks the loss can run)."""
        _, scheduler = self._unet_and_scheduler(pl_module)
        return _loss_scheduler_timesteps(scheduler, type(self).__name__)

    def denoising_loss(self, pl_module: Any, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-sample training loss (B,) of the pipeline's ``unet`` with its ``scheduler``.

        The same objective as :meth:`DiffusersSampler.denoising_loss` (the scheduler's ``prediction_type``);
        ``x0`` (B, C, H, W) in ``data_range`` is mapped to ``model_range``; ``t`` are integer timesteps (B,) in
        ``[0, num_train_timesteps)``; ``noise`` is standard normal, shaped like ``x0``.
        """
        unet, scheduler = self._unet_and_scheduler(pl_module)
        _loss_scheduler_timesteps(scheduler, type(self).__name__)
        x0, t, noise = _loss_inputs(x0, t, noise, module_device(unet, pl_module))
        x0 = map_range(x0, self.data_range, self.model_range)
        return _training_loss(unet, scheduler, x0, t, noise)

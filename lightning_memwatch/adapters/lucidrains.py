"""lucidrains' ``GaussianDiffusion`` (denoising-diffusion-pytorch) as a MemWatch ``sample_fn``.

``GaussianDiffusion.sample`` draws its initial noise from the global RNG. This adapter runs the same reverse
process (its DDIM when ``sampling_timesteps < timesteps``, else its ancestral sampler) from MemWatch's
per-sample noise through the model's public methods (``model_predictions``, ``p_mean_variance``), so samples
are independent of batch size and world size, and the global RNG is not touched. Its
:meth:`~LucidrainsSampler.denoising_loss` is the model's own training loss (``p_losses``) for the loss-gap
probe. The package is never imported by ``import lightning_memwatch``.

Class-conditional models: the classifier-free-guidance ``GaussianDiffusion`` of
``denoising_diffusion_pytorch.classifier_free_guidance`` (its ``Unet(num_classes=...)``) is driven the same way,
with MemWatch's per-sample classes as its ``classes`` and the guidance scale ``cond_scale`` (the package's
default, 6). MemWatch passes classes only to a model that takes them (:meth:`LucidrainsSampler.takes_labels`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_memwatch._checks import config_error, config_type_error
from lightning_memwatch.adapters._range import ModuleRef, Range, check_range_arg, map_range, resolve_module

__all__ = ["LucidrainsSampler"]

_OBJECTIVES = ("pred_noise", "pred_x0", "pred_v")


def _is_guided(diffusion: Any) -> bool:
    """Whether ``diffusion`` is the classifier-free-guidance GaussianDiffusion (its predictions take ``classes``)."""
    try:
        return "classes" in inspect.signature(diffusion.model_predictions).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _model_range(diffusion: Any) -> Range:
    """(0, 1) when the model un-normalizes its samples (``auto_normalize=True``, its default, and always for the
    classifier-free-guidance model), else (-1, 1)."""
    if _is_guided(diffusion):
        return (0.0, 1.0)
    name = getattr(getattr(diffusion, "unnormalize", None), "__name__", "")
    return (0.0, 1.0) if name == "unnormalize_to_zero_to_one" else (-1.0, 1.0)


class LucidrainsSampler:
    """``sample_fn`` for a ``denoising_diffusion_pytorch.GaussianDiffusion`` held by the LightningModule.

    Example:
        >>> from lightning_memwatch.adapters import LucidrainsSampler
        >>> sample_fn = LucidrainsSampler(diffusion="diffusion", data_range=(0.0, 1.0))

    Args:
        diffusion: Where the ``GaussianDiffusion`` is: an attribute name of the LightningModule (``"diffusion"``),
            a function ``fn(pl_module) -> GaussianDiffusion``, or None when the LightningModule is one. Looked up
            at every call, so the weights MemWatch evaluates are the ones used.
        data_range: ``(low, high)`` of the training images MemWatch compares with; samples are mapped affinely
            from the model's own range to it. None: the model's range, which is (0, 1) with
            ``auto_normalize=True`` (the package's default: it takes and returns images in [0, 1]) and (-1, 1)
            with ``auto_normalize=False``.
        sampling_timesteps: Override the model's ``sampling_timesteps`` (DDIM steps) for evaluation; None keeps it.
        eta: Override the model's ``ddim_sampling_eta``; None keeps it (0: deterministic DDIM).
        cond_scale: classifier-free guidance scale of a class-conditional model (``classifier_free_guidance``'s
            ``GaussianDiffusion``): 1 is the conditional model alone; the package's default is 6.
        rescaled_phi: that model's guidance rescaling (its default 0.7).
    """

    def __init__(
        self,
        diffusion: ModuleRef = "diffusion",
        *,
        data_range: Sequence[float] | None = None,
        sampling_timesteps: int | None = None,
        eta: float | None = None,
        cond_scale: float = 6.0,
        rescaled_phi: float = 0.7,
    ) -> None:
        if sampling_timesteps is not None and sampling_timesteps < 1:
            raise config_error(f"sampling_timesteps must be >= 1 or None; got {sampling_timesteps}.")
        self.diffusion = diffusion
        self.data_range: Range | None = None if data_range is None else check_range_arg(data_range, "data_range")
        self.sampling_timesteps = sampling_timesteps
        self.eta = eta
        self.cond_scale = float(cond_scale)
        self.rescaled_phi = float(rescaled_phi)

    def takes_labels(self, pl_module: Any) -> bool:
        """Whether the model is class-conditional (MemWatch then passes ``labels``, its ``classes``)."""
        return _is_guided(self._resolve(pl_module))

    def _resolve(self, pl_module: Any) -> Any:
        diffusion = resolve_module(pl_module, self.diffusion, "GaussianDiffusion")
        for attr in ("model_predictions", "p_mean_variance", "alphas_cumprod", "num_timesteps", "image_size"):
            if not hasattr(diffusion, attr):
                raise config_type_error(
                    f"LucidrainsSampler needs a denoising_diffusion_pytorch.GaussianDiffusion; "
                    f"{type(diffusion).__name__} has no `{attr}`."
                )
        return diffusion

    def _guidance(self, labels: Tensor | None) -> dict[str, Any]:
        """The keyword arguments of a guided model's predictions (``classes``, ``cond_scale``, ``rescaled_phi``)."""
        return {"classes": labels, "cond_scale": self.cond_scale, "rescaled_phi": self.rescaled_phi}

    def _ddim(
        self,
        diffusion: Any,
        x: Tensor,
        steps: int,
        eta: float,
        generator: torch.Generator | None,
        labels: Tensor | None = None,
    ) -> Tensor:
        total = int(diffusion.num_timesteps)
        times = torch.linspace(-1, total - 1, steps=steps + 1).int().tolist()[::-1]
        x_start = None
        for time, time_next in zip(times[:-1], times[1:]):
            t = torch.full((len(x),), time, device=x.device, dtype=torch.long)
            if labels is not None:  # classifier-free guidance
                pred_noise, x_start, *_ = diffusion.model_predictions(x, t, **self._guidance(labels), clip_x_start=True)
            else:
                cond = x_start if getattr(diffusion, "self_condition", False) else None
                pred_noise, x_start, *_ = diffusion.model_predictions(
                    x, t, cond, clip_x_start=True, rederive_pred_noise=True
                )
            if time_next < 0:
                x = x_start
                continue
            alpha, alpha_next = diffusion.alphas_cumprod[time], diffusion.alphas_cumprod[time_next]
            sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            x = x_start * alpha_next.sqrt() + (1 - alpha_next - sigma**2).sqrt() * pred_noise
            if eta > 0:
                x = x + sigma * _randn_like(x, generator)
        return x

    def _ancestral(
        self, diffusion: Any, x: Tensor, generator: torch.Generator | None, labels: Tensor | None = None
    ) -> Tensor:
        x_start = None
        for time in reversed(range(int(diffusion.num_timesteps))):
            t = torch.full((len(x),), time, device=x.device, dtype=torch.long)
            if labels is not None:  # classifier-free guidance
                mean, _, log_variance, x_start = diffusion.p_mean_variance(
                    x=x, t=t, **self._guidance(labels), clip_denoised=True
                )
            else:
                cond = x_start if getattr(diffusion, "self_condition", False) else None
                mean, _, log_variance, x_start = diffusion.p_mean_variance(
                    x=x, t=t, x_self_cond=cond, clip_denoised=True
                )
            x = mean + (0.5 * log_variance).exp() * _randn_like(x, generator) if time > 0 else mean
        return x

    def __call__(
        self,
        pl_module: Any,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples (B, C, H, W) in ``data_range``, float32, on the model's device;
        ``labels`` (B,): the classes of a class-conditional model."""
        diffusion = self._resolve(pl_module)
        device = diffusion.alphas_cumprod.device
        guided = _is_guided(diffusion)
        if guided != (labels is not None):
            raise config_error(
                "LucidrainsSampler: the classifier-free-guidance GaussianDiffusion needs `labels` (its classes; "
                "MemWatch passes them from the training labels)" if guided else "LucidrainsSampler got `labels`, but "
                f"{type(diffusion).__module__}.GaussianDiffusion is unconditional: use the classifier_free_guidance "
                "model, or drop the labels."
            )
        if labels is not None:
            if labels.shape != (num_samples,):
                raise config_error(f"labels must have shape ({num_samples},); got {tuple(labels.shape)}.")
            labels = labels.to(device=device, dtype=torch.long)
        if noise is None:
            h, w = diffusion.image_size if not isinstance(diffusion.image_size, int) else (diffusion.image_size,) * 2
            gen_device = generator.device if generator is not None else device
            noise = torch.randn((num_samples, diffusion.channels, h, w), generator=generator, device=gen_device)
        elif len(noise) != num_samples:
            raise config_error(f"noise has {len(noise)} rows but num_samples={num_samples}; pass matching sizes.")
        x = noise.to(device=device, dtype=torch.float32)
        steps = self.sampling_timesteps or int(getattr(diffusion, "sampling_timesteps", diffusion.num_timesteps))
        eta = float(self.eta if self.eta is not None else getattr(diffusion, "ddim_sampling_eta", 0.0))
        with torch.no_grad():
            if steps < int(diffusion.num_timesteps):
                x = self._ddim(diffusion, x, steps, eta, generator, labels)
            else:
                x = self._ancestral(diffusion, x, generator, labels)
            x = (x + 1) * 0.5 if guided else diffusion.unnormalize(x)  # the guided model always returns [0, 1]
        model_range = _model_range(diffusion)
        return map_range(x.float(), model_range, self.data_range or model_range)

    # -- the loss-gap probe's loss (optional part of the sampler contract) -----------------------------------
    def _resolve_for_loss(self, pl_module: Any) -> Any:
        diffusion = self._resolve(pl_module)
        needed = ["model", "objective", "loss_weight", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"]
        needed += ["predict_v"] + ([] if _is_guided(diffusion) else ["normalize"])  # the guided one always is
        missing = [attr for attr in needed if not hasattr(diffusion, attr)]
        if missing or diffusion.objective not in _OBJECTIVES:
            what = f"no `{missing[0]}`" if missing else f"objective {diffusion.objective!r} (known: {_OBJECTIVES})"
            raise config_type_error(
                f"LucidrainsSampler.denoising_loss needs GaussianDiffusion's training pieces; "
                f"{type(diffusion).__name__} has {what}. Pass `LossGapProbe(loss_fn=...)` instead."
            )
        return diffusion

    def num_timesteps(self, pl_module: Any) -> int:
        """T of the model's diffusion (``GaussianDiffusion.num_timesteps``); checks the loss can be computed."""
        return int(self._resolve_for_loss(pl_module).num_timesteps)

    def denoising_loss(
        self, pl_module: Any, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Per-sample training loss (B,) of the ``GaussianDiffusion``: its ``p_losses`` with the given t and noise.

        ``x0`` (in ``data_range``) is mapped to the model's range and normalized as its ``forward`` does (to [-1, 1]
        with ``auto_normalize``, and always for the classifier-free-guidance model), noised to ``t`` with ``noise``,
        and the network's output is compared with the target of its ``objective`` (``pred_noise``: the noise,
        ``pred_x0``: the image, ``pred_v``: v); the per-sample MSE is weighted by its ``loss_weight[t]`` (SNR-based,
        min-SNR when enabled), as ``p_losses`` does. Three random parts of ``p_losses`` are left out, so that a
        fixed triple gives a fixed loss: offset noise, immiscible noise assignment (a batch-dependent permutation of
        the noise) and self-conditioning (the loss is the one of its unconditioned half). Without them it equals
        ``p_losses(x0, t, noise, loss_reduction="none")`` (tested; for the guided model, with every class kept).
        Gradients and train/eval mode follow the caller.

        Args:
            pl_module: The LightningModule holding the model (found as for sampling).
            x0: Clean images (B, C, H, W) in ``data_range``.
            t: Integer timesteps (B,) in ``[0, num_timesteps)``.
            noise: Standard normal noise shaped like ``x0``.
            labels: Classes (B,) of the classifier-free-guidance model (required there), all kept: no class
                is dropped to the null class, so the loss is the conditional one.
        """
        diffusion = self._resolve_for_loss(pl_module)
        guided = _is_guided(diffusion)
        if guided != (labels is not None):
            raise config_error(
                "LucidrainsSampler.denoising_loss: the classifier-free-guidance model needs `labels` (its classes)"
                if guided
                else "LucidrainsSampler.denoising_loss got `labels`, but the model is unconditional: drop them."
            )
        if x0.shape != noise.shape or t.shape != (len(x0),):
            raise config_error(
                f"denoising_loss needs x0 (B, ...), t (B,) and noise shaped like x0; got {tuple(x0.shape)}, "
                f"{tuple(t.shape)}, {tuple(noise.shape)}."
            )
        device = diffusion.alphas_cumprod.device
        model_range = _model_range(diffusion)
        x0 = map_range(x0.to(device=device, dtype=torch.float32), self.data_range or model_range, model_range)
        x_start = x0 * 2 - 1 if guided else diffusion.normalize(x0)
        t = t.to(device=device, dtype=torch.long)
        noise = noise.to(device=device, dtype=torch.float32)
        shape = (len(t),) + (1,) * (x_start.dim() - 1)
        x_t = (
            diffusion.sqrt_alphas_cumprod[t].reshape(shape) * x_start
            + diffusion.sqrt_one_minus_alphas_cumprod[t].reshape(shape) * noise
        )
        if labels is not None:
            out = diffusion.model(x_t, t, labels.to(device=device, dtype=torch.long), cond_drop_prob=0.0)
        else:
            out = diffusion.model(x_t, t, None)
        if diffusion.objective == "pred_noise":
            target = noise
        elif diffusion.objective == "pred_x0":
            target = x_start
        else:
            target = diffusion.predict_v(x_start, t, noise)
        loss = (out.float() - target).pow(2).flatten(1).mean(1)
        return loss * diffusion.loss_weight[t].float()


def _randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)

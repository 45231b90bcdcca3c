"""A DDPM LightningModule with the paper's training loop and a deterministic DDIM ``sample`` for MemWatch.

Architecture-agnostic: it wraps any noise predictor ``denoiser(x_t, t) -> eps_hat`` (the paper's
:class:`~lightning_memwatch.apps.models.unet.UNet`, the GMM
:class:`~lightning_memwatch.apps.models.gmm_mlp.ResidualMLP`, or a user's own ``nn.Module``).

Training (``paper_protocol.md`` sections 3-4): ``T = 1000``, linear betas ``1e-4 .. 0.02``,
``t ~ U{1, ..., T-1}``, plain epsilon MSE, no EMA, constant learning rate, SGD with momentum 0.95 or Adam;
one batch = one optimizer step (training time = ``trainer.global_step``). The batch size belongs to the
datamodule (``min(512, n)``).

Sampling: :meth:`DDPM.sample` runs deterministic DDIM (eta = 0) over ``int(linspace(0, T-1, 100))`` reversed,
in eval mode (dropout off) and without gradients; it accepts MemWatch's ``generator`` and ``noise`` keywords.

Class-conditional: with a denoiser built with ``num_classes`` (the recipe's ``UNet`` and ``ResidualMLP`` add
a learned class embedding), training batches are ``(images, labels)`` and :meth:`DDPM.sample` takes MemWatch's
``labels`` (:attr:`DDPM.conditional` tells MemWatch to pass them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memwatch.apps.models.diffusion import (
    alphas_cumprod,
    ddim_sample,
    ddim_timesteps,
    linear_beta_schedule,
    q_sample,
)

_OPTIMIZERS = ("sgd", "adam")


class DDPM(L.LightningModule):
    """Epsilon-prediction DDPM around ``denoiser``, trained as in the paper and sampled by DDIM-100 (eta = 0).

    Args:
        denoiser: Noise predictor called as ``denoiser(x_t, t)`` with ``t`` int64 (B,) in [0, T); returns
            a tensor shaped like ``x_t``.
        num_timesteps: ``T`` (diffusion steps).
        beta_start: First beta for T = 1000 (the schedule is rescaled by 1000 / T).
        beta_end: Last beta for T = 1000.
        optimizer: ``"sgd"`` (torch SGD with ``momentum``, no Nesterov, no weight decay: the paper's
            "SGD_Momentum") or ``"adam"`` (torch defaults).
        lr: Constant learning rate (1e-2 is the paper code's CelebA default with SGD; 1e-4 its Adam example).
        momentum: SGD momentum (0.95 in the paper); ignored by Adam.
        sample_steps: DDIM timesteps ``S`` (100 in the paper; ``S - 1`` denoiser evaluations per sample).
        sample_shape: Shape of one sample, e.g. ``(1, 32, 32)``; ``None``: read from the datamodule's
            ``sample_shape`` when attached to a Trainer (or from ``noise`` when :meth:`sample` receives it).
        data_range: ``(low, high)`` of the training data; ``None``: the datamodule's ``data_range`` when
            attached (``None`` there too, e.g. Gaussian data: unbounded).
        clip_samples: Clamp returned samples to ``data_range`` when it is known. The paper's sampler does not
            clip; clipping only touches samples outside the data's range (early, noisy models) and keeps
            MemWatch's range checks and FID de-normalisation meaningful. Set ``False`` for the raw sampler.
        fixed_timestep: Train at this single diffusion step instead of ``U{1..T-1}`` (the paper code's
            ``-t k`` mode); ``None`` for normal training.
        ema_decay: Keep an exponential moving average of the denoiser with this decay and sample from it.
            ``None`` (the paper: no EMA).
        sample_autocast: Run the sampler under bf16 autocast on the module's device (faster on GPUs; the
            DDIM arithmetic itself stays float32).
    """

    def __init__(
        self,
        denoiser: nn.Module,
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        optimizer: Literal["sgd", "adam"] = "sgd",
        lr: float = 1e-2,
        momentum: float = 0.95,
        sample_steps: int = 100,
        sample_shape: Sequence[int] | None = None,
        data_range: tuple[float, float] | None = None,
        clip_samples: bool = True,
        fixed_timestep: int | None = None,
        ema_decay: float | None = None,
        sample_autocast: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, nn.Module):
            raise TypeError(
                f"denoiser must be an nn.Module called as denoiser(x_t, t); got {type(denoiser).__name__}."
            )
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}; got {optimizer!r}.")
        if lr <= 0:
            raise ValueError(f"lr must be > 0; got {lr}.")
        if not 2 <= sample_steps <= num_timesteps:
            raise ValueError(
                f"sample_steps must lie in [2, num_timesteps={num_timesteps}]; got {sample_steps}."
            )
        if fixed_timestep is not None and not 0 <= fixed_timestep < num_timesteps:
            raise ValueError(
                f"fixed_timestep must lie in [0, {num_timesteps}) or be None; got {fixed_timestep}."
            )
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None; got {ema_decay}.")
        if data_range is not None and not float(data_range[0]) < float(data_range[1]):
            raise ValueError(f"data_range must be (low, high) with low < high; got {data_range}.")
        self.save_hyperparameters(ignore=["denoiser"])
        self.denoiser = denoiser
        self.num_timesteps = num_timesteps
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.sample_steps = sample_steps
        self.clip_samples = clip_samples
        self.fixed_timestep = fixed_timestep
        self.ema_decay = ema_decay
        self.sample_autocast = sample_autocast
        self._sample_shape = tuple(int(s) for s in sample_shape) if sample_shape is not None else None
        self._data_range = (float(data_range[0]), float(data_range[1])) if data_range is not None else None
        betas = linear_beta_schedule(num_timesteps, beta_start, beta_end)
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alpha_bar", alphas_cumprod(betas), persistent=False)
        self.ema_denoiser: nn.Module | None = None
        if ema_decay is not None:
            self.ema_denoiser = copy.deepcopy(denoiser).requires_grad_(False).eval()

    # ------------------------------------------------------------------ data description
    def _datamodule(self) -> object | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    @property
    def data_range(self) -> tuple[float, float] | None:
        """``(low, high)`` of the data: the constructor's value, else the attached datamodule's, or None."""
        if self._data_range is not None:
            return self._data_range
        value = getattr(self._datamodule(), "data_range", None)
        return (float(value[0]), float(value[1])) if value is not None else None

    @property
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one sample: the constructor's value, else the attached datamodule's, else ``None``."""
        if self._sample_shape is not None:
            return self._sample_shape
        value = getattr(self._datamodule(), "sample_shape", None)
        return tuple(int(s) for s in value) if value is not None else None

    # ------------------------------------------------------------------ training
    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The denoiser's noise prediction ``eps_hat(x_t, t)``."""
        return self.denoiser(x_t, t)

    @property
    def conditional(self) -> bool:
        """Whether the denoiser is class-conditional (built with ``num_classes``): then :meth:`sample` needs
        ``labels`` and training batches are ``(images, labels)``."""
        return getattr(self.denoiser, "num_classes", None) is not None

    def _net_call(self, net: nn.Module, labels: Tensor | None) -> nn.Module | object:
        """``net`` as ``fn(x_t, t)``, with the classes bound when given."""
        if labels is None:
            return net
        return lambda x_t, t: net(x_t, t, labels)

    def diffusion_loss(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
        """Epsilon MSE at ``t ~ U{1..T-1}`` (or the fixed timestep), averaged over entries and batch; ``labels``
        (B,): the classes of a class-conditional denoiser."""
        batch = x0.shape[0]
        if self.fixed_timestep is None:
            t = torch.randint(1, self.num_timesteps, (batch,), device=x0.device)
        else:
            t = torch.full((batch,), self.fixed_timestep, dtype=torch.long, device=x0.device)
        noise = torch.randn_like(x0)
        x_t = q_sample(x0, t, noise, self.alpha_bar)
        return F.mse_loss(self._net_call(self.denoiser, labels)(x_t, t), noise)  # type: ignore[operator]

    def denoising_loss(self, x0: Tensor, t: Tensor, noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """Per-sample epsilon MSE (B,) of ``x0`` noised to steps ``t`` with ``noise``: the loss-gap probe's contract.

        Uses the network that :meth:`sample` uses (the EMA copy when ``ema_decay`` is set), so the probe
        watches the model MemWatch samples. Gradients follow the caller's mode (the probe calls it under
        ``torch.no_grad``); the module's train/eval mode is left to the caller.

        Args:
            x0: Clean images (B, ...), in the training scale.
            t: Int64 diffusion steps (B,) in ``[0, num_timesteps)``.
            noise: Standard normal noise shaped like ``x0``.
            labels: Classes (B,) of a class-conditional denoiser (``num_classes``).
        """
        x0 = x0.to(device=self.alpha_bar.device, dtype=torch.float32)
        noise = noise.to(device=x0.device, dtype=torch.float32)
        t = t.to(device=x0.device, dtype=torch.long)
        net = self.ema_denoiser if self.ema_denoiser is not None else self.denoiser
        if labels is not None:
            labels = labels.to(device=x0.device, dtype=torch.long)
        eps = self._net_call(net, labels)(q_sample(x0, t, noise, self.alpha_bar), t).float()  # type: ignore[operator]
        return (eps - noise).pow(2).flatten(1).mean(1)

    def training_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        if self.conditional:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise ValueError(
                    "DDPM: the denoiser is class-conditional (num_classes), so training batches must be (images, "
                    "labels); this batch holds images only (e.g. DigitsDataModule(labelled=True))."
                )
            loss = self.diffusion_loss(x0, batch[1])
        else:
            loss = self.diffusion_loss(x0)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x0.shape[0])
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.ema_denoiser is not None and self.ema_decay is not None:
            with torch.no_grad():
                ema = [p for p in self.ema_denoiser.parameters()]
                raw = [p.detach() for p in self.denoiser.parameters()]
                torch._foreach_lerp_(ema, raw, 1.0 - self.ema_decay)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.denoiser.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        num_samples: int,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        labels: Tensor | None = None,
    ) -> Tensor:
        """Draw ``num_samples`` samples by deterministic DDIM (eta = 0), MemWatch's sampler contract.

        Args:
            num_samples: Number of samples (images).
            generator: Draws the initial noise when ``noise`` is not given (on the generator's device, then
                moved); eta = 0 needs no other randomness.
            noise: Initial noise ``x_T`` (num_samples, *sample_shape); used as given (never modified).
            num_steps: DDIM timesteps; default ``sample_steps`` (100).
            labels: Classes (num_samples,) of a class-conditional denoiser (MemWatch passes them).

        Returns:
            Float32 tensor (num_samples, *sample_shape) on the module's device, in ``data_range``
            (clamped when ``clip_samples`` and the range is known).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
        if noise is None:
            shape = self.sample_shape
            if shape is None:
                raise ValueError(
                    "DDPM.sample cannot tell the sample shape: pass sample_shape=(C, H, W) to DDPM, attach a "
                    "datamodule with a `sample_shape` attribute, or pass `noise`."
                )
            noise_device = generator.device if generator is not None else self.device
            noise = torch.randn((num_samples, *shape), generator=generator, device=noise_device)
        elif noise.shape[0] != num_samples:
            raise ValueError(
                f"noise has {noise.shape[0]} rows but num_samples={num_samples}; pass matching sizes."
            )
        noise = noise.to(device=self.device, dtype=torch.float32)
        if self.conditional and labels is None:
            raise ValueError("DDPM.sample: the denoiser is class-conditional (num_classes); pass `labels` (B,).")
        if labels is not None:
            labels = labels.to(device=self.device, dtype=torch.long)
        timesteps = ddim_timesteps(self.num_timesteps, num_steps or self.sample_steps)
        net = self.ema_denoiser if self.ema_denoiser is not None else self.denoiser
        was_training = net.training
        net.eval()
        try:
            with (
                torch.no_grad(),
                torch.autocast(
                    device_type=self.device.type, dtype=torch.bfloat16, enabled=self.sample_autocast
                ),
            ):
                x = ddim_sample(self._net_call(net, labels), noise, self.alpha_bar, timesteps)  # type: ignore[arg-type]
        finally:
            net.train(was_training)
        x = x.float()
        data_range = self.data_range
        if self.clip_samples and data_range is not None:
            x = x.clamp(data_range[0], data_range[1])
        return x

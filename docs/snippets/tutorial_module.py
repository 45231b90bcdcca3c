"""A small diffusion model with a `sample` method: everything MemWatch needs from your LightningModule.

DDPM training (T = 1000 linear betas, noise-prediction MSE) and deterministic DDIM sampling (eta = 0) with a
residual-MLP denoiser, for 8x8 grayscale images in [-1, 1]. About 5 ms per training step on one CPU core.
"""

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class Denoiser(nn.Module):
    """Predicts the noise in x_t: a residual MLP on the flattened image, told t by a sinusoidal encoding."""

    def __init__(self, image_shape=(1, 8, 8), width=128, num_blocks=3):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.width = width
        dim = math.prod(self.image_shape)
        self.inp = nn.Linear(dim, width)
        self.time = nn.ModuleList(nn.Linear(width, width) for _ in range(num_blocks))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, width))
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def encode_time(self, t: Tensor) -> Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h, enc = self.inp(x.flatten(1)), self.encode_time(t)
        for time, block in zip(self.time, self.blocks):
            h = h + block(h + time(enc))
        return self.out(h).view(len(x), *self.image_shape)


class TinyDiffusion(L.LightningModule):
    """DDPM on small images; `sample` uses an exponential moving average (EMA) of the denoiser's weights."""

    def __init__(self, image_shape=(1, 8, 8), width=128, lr=2e-3, ema_decay=0.995, num_timesteps=1000,
                 sample_steps=20):
        super().__init__()
        self.save_hyperparameters()
        self.image_shape = tuple(image_shape)
        self.denoiser = Denoiser(image_shape, width)
        self.ema = None  # ema_decay=None: sample from the raw weights
        if ema_decay is not None:
            self.ema = AveragedModel(self.denoiser, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        betas = torch.linspace(1e-4, 0.02, num_timesteps)
        self.register_buffer("alpha_bar", torch.cumprod(1.0 - betas, dim=0))

    def training_step(self, batch, batch_idx):
        x0 = batch[0] if isinstance(batch, (list, tuple)) else batch
        t = torch.randint(1, self.hparams.num_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        a = self.alpha_bar[t].view(-1, *[1] * (x0.ndim - 1))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(self.denoiser(x_t, t), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            self.ema.update_parameters(self.denoiser)

    def configure_optimizers(self):
        return torch.optim.Adam(self.denoiser.parameters(), lr=self.hparams.lr)

    @torch.no_grad()
    def sample(self, num_samples: int, generator: torch.Generator | None = None, noise: Tensor | None = None):
        """`num_samples` images in [-1, 1] by deterministic DDIM (eta = 0), with the EMA weights if kept.

        This is MemWatch's sampler contract: MemWatch passes `noise` (the initial x_T, the same for sample i at
        every evaluation) and a seeded `generator`; called on its own, the noise is drawn here.
        """
        if noise is None:
            device = generator.device if generator is not None else self.device
            noise = torch.randn((num_samples, *self.image_shape), generator=generator, device=device)
        x = noise.to(self.device)
        net = self.ema.module if self.ema is not None else self.denoiser
        steps = torch.linspace(0, self.hparams.num_timesteps - 1, self.hparams.sample_steps).long().flip(0)
        for t, t_prev in zip(steps[:-1].tolist(), steps[1:].tolist()):
            a_t, a_prev = self.alpha_bar[t], self.alpha_bar[t_prev]
            eps = net(x, torch.full((len(x),), t, device=self.device))
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x.clamp(-1.0, 1.0)

"""Memorization in a feature space (latent diffusion): `MemWatch(feature_fn=...)`."""

import torch
from torch import nn
from tutorial_module import TinyDiffusion

from lightning_memwatch import MemWatch


class FrozenEncoder(nn.Module):
    """Stands for your autoencoder's encoder (or any frozen feature network): images (N, 1, 8, 8) -> (N, 16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(128, 16))
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images)


class LatentModel(TinyDiffusion):
    """Stands for a latent diffusion model: `decode` maps latents to images, which `sample` returns."""

    def decode(self, latents):
        return latents  # a real model runs its decoder here

    def sample(self, num_samples, generator=None, noise=None):
        latents = super().sample(num_samples, generator=generator, noise=noise)
        return self.decode(latents)


def make_watch(encoder, **kwargs):
    # --8<-- [start:feature_fn]
    @torch.no_grad()
    def feature_fn(images):
        """Training images and samples (N, C, H, W) -> features (N, D). Deterministic: use the encoder's mean."""
        return encoder(images.to(next(encoder.parameters()).device)).flatten(1)

    watch = MemWatch(
        feature_fn=feature_fn,  # nearest neighbours and the ratio test in the encoder's space
        # noise_shape=(4, 32, 32),  # when `noise` is a latent, not an image: the shape of one latent
        **kwargs,  # your other MemWatch settings
    )
    # --8<-- [end:feature_fn]
    return watch

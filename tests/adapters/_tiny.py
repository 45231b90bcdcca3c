"""Tiny models, data and a one-evaluation MemWatch fit shared by the adapter tests (seeded)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_memwatch import MemWatch


def images(n: int = 32, low: float = -1.0, high: float = 1.0, seed: int = 0) -> torch.Tensor:
    """``n`` distinct (1, 8, 8) images spanning [low, high]."""
    x = torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0  # every image spans the whole range
    return x * (high - low) + low


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_class_unet(num_classes: int = 4):
    """A tiny class-conditional ``UNet2DModel`` (``num_class_embeds``)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_classes,
    )  # fmt: skip


def tiny_guided_diffusion(num_classes: int = 4, sampling_timesteps: int = 5, timesteps: int = 100):
    """A tiny classifier-free-guidance ``GaussianDiffusion`` around its ``Unet(num_classes=...)`` (DDIM, eta 0)."""
    from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion, Unet

    torch.manual_seed(0)
    net = Unet(dim=8, num_classes=num_classes, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=4)
    return GaussianDiffusion(
        net, image_size=8, timesteps=timesteps, sampling_timesteps=sampling_timesteps, ddim_sampling_eta=0.0
    )


def tiny_gaussian_diffusion(sampling_timesteps: int = 5, auto_normalize: bool = True, timesteps: int = 100):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=4)
    return GaussianDiffusion(
        net,
        image_size=8,
        timesteps=timesteps,
        sampling_timesteps=sampling_timesteps,
        auto_normalize=auto_normalize,
    )


class Holder(LightningModule):
    """A LightningModule holding one network under ``name``, trained on a dummy loss."""

    def __init__(self, name: str, net: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, name, net)
        self.name = name

    def training_step(self, batch, batch_idx):
        return sum(p.sum() for p in getattr(self, self.name).parameters()) * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def one_evaluation(tmp_path, module: LightningModule, sample_fn, train: torch.Tensor, data_range) -> MemWatch:
    """Fit one step with a MemWatch that evaluates at step 0 through ``sample_fn``; return the watch."""
    watch = MemWatch(
        train_data=train,
        num_samples=8,
        sample_batch_size=4,
        schedule=[0],
        sample_fn=sample_fn,
        data_range=data_range,
        bootstrap=50,
        log_images=False,
        verbose=False,
    )
    loader = DataLoader(TensorDataset(train), batch_size=8)
    trainer = Trainer(
        max_steps=1,
        callbacks=[watch],
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    return watch


def fit_with_probe(tmp_path, module: LightningModule, train: torch.Tensor, heldout: torch.Tensor, callbacks, probe):
    """Fit 4 optimizer steps with ``callbacks`` and ``probe`` reading every 2 steps; return the trainer."""
    loader = DataLoader(TensorDataset(train), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = Trainer(
        max_steps=4,
        callbacks=[*callbacks, probe],
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, loader)
    return trainer


class Trained(LightningModule):
    """Trains the network under ``name`` with ``loss(self, x0)`` (Adam), as a user's module would."""

    def __init__(self, name: str, net: torch.nn.Module, loss) -> None:
        super().__init__()
        setattr(self, name, net)
        self._loss = loss

    def training_step(self, batch, batch_idx):
        return self._loss(self, batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

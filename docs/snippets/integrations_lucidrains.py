"""lucidrains' GaussianDiffusion (denoising-diffusion-pytorch) in MemWatch."""

import lightning as L
import torch
from denoising_diffusion_pytorch import GaussianDiffusion, Unet

from lightning_memwatch import EvalSchedule, MemWatch
from lightning_memwatch.adapters import LucidrainsSampler


# --8<-- [start:lucidrains]
class Lucidrains(L.LightningModule):
    """GaussianDiffusion takes and returns images in [0, 1] (its default auto_normalize=True)."""

    def __init__(self, diffusion: GaussianDiffusion, lr: float = 1e-3):
        super().__init__()
        self.diffusion = diffusion
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.diffusion(batch[0])  # the package's own loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def lucidrains_model(image_size: int = 32, dim: int = 64) -> Lucidrains:
    net = Unet(dim=dim, dim_mults=(1, 2), channels=1)
    return Lucidrains(GaussianDiffusion(net, image_size=image_size, timesteps=1000, sampling_timesteps=50))


# its DDIM (sampling_timesteps=50, eta=0) from MemWatch's per-sample noise, mapped to the data's range
watch = MemWatch(
    sample_fn=LucidrainsSampler("diffusion", data_range=(0.0, 1.0)),
    data_range=(0.0, 1.0),
    schedule=EvalSchedule.every(500),
)
# --8<-- [end:lucidrains]

"""diffusers models in MemWatch: a UNet2DModel with any scheduler, or a DiffusionPipeline, without writing `sample`."""

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler, UNet2DModel

from lightning_memwatch import EvalSchedule, LossGapProbe, MemWatch
from lightning_memwatch.adapters import DiffusersSampler, PipelineSampler


# --8<-- [start:unet]
class DiffusersDDPM(L.LightningModule):
    """A diffusers UNet trained as in diffusers' examples, on images in [0, 1] scaled to diffusers' [-1, 1]."""

    def __init__(self, unet: UNet2DModel, lr: float = 1e-3):
        super().__init__()
        self.unet = unet
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x = batch[0] * 2 - 1  # the dataset's [0, 1] to diffusers' [-1, 1]
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),), device=x.device)
        return F.mse_loss(self.unet(self.noise_scheduler.add_noise(x, noise, t), t).sample, noise)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


sample_fn = DiffusersSampler(
    DDIMScheduler(num_train_timesteps=1000),  # any diffusers scheduler; copied at each call, never modified
    num_inference_steps=50,
    unet="unet",  # the attribute holding the denoiser, read at every evaluation
    model_range=(-1.0, 1.0),  # what the UNet was trained on (diffusers' convention)
    data_range=(0.0, 1.0),  # what MemWatch compares with: the training images' range
)
watch = MemWatch(sample_fn=sample_fn, data_range=(0.0, 1.0), schedule=EvalSchedule.every(500))
# --8<-- [end:unet]


def pipeline_watch(module: DiffusersDDPM) -> MemWatch:
    # --8<-- [start:pipeline]
    module.pipeline = DDIMPipeline(unet=module.unet, scheduler=DDIMScheduler())  # shares the module's UNet
    watch = MemWatch(
        sample_fn=PipelineSampler("pipeline", num_inference_steps=50, data_range=(0.0, 1.0)),
        data_range=(0.0, 1.0),
    )
    # --8<-- [end:pipeline]
    return watch


def watch_and_probe(heldout_images: torch.Tensor) -> list[L.Callback]:
    # --8<-- [start:probe]
    # the probe's loss is sample_fn.denoising_loss, found through the MemWatch that samples with sample_fn
    # (or named: LossGapProbe(sampler=sample_fn)); held-out images: never trained on, e.g. the FID reference
    probe = LossGapProbe(heldout_data=heldout_images)
    callbacks = [watch, probe]  # L.Trainer(callbacks=callbacks)
    # --8<-- [end:probe]
    return callbacks

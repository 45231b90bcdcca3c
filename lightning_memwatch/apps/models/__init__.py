"""Recipe models: the paper's U-Net, the GMM residual MLP and the architecture-agnostic DDPM module.

These serve the recipes and the demo; users' own training code only needs the library core
(``MemWatch``, ``EvalSchedule``, ``FID`` ...).
"""

from lightning_memwatch.apps.models.ddpm import DDPM
from lightning_memwatch.apps.models.diffusion import (
    alphas_cumprod,
    ddim_sample,
    ddim_timesteps,
    linear_beta_schedule,
    q_sample,
)
from lightning_memwatch.apps.models.gmm_mlp import ResidualMLP
from lightning_memwatch.apps.models.unet import UNet, count_parameters

__all__ = [
    "DDPM",
    "ResidualMLP",
    "UNet",
    "alphas_cumprod",
    "count_parameters",
    "ddim_sample",
    "ddim_timesteps",
    "linear_beta_schedule",
    "q_sample",
]

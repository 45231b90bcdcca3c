"""Recipe datamodules: CelebA 32x32 gray (the paper), the two-Gaussian mixture, scikit-learn digits.

Each exposes ``train_images()``, ``heldout_images()`` (the FID reference), ``data_range`` and ``sample_shape``
after ``setup()``; batches are plain tensors of ``min(512, n)`` samples by default.
"""

from lightning_memwatch.apps.data.base import TensorDataModule, normalize_unit_images
from lightning_memwatch.apps.data.celeba import CelebA32DataModule
from lightning_memwatch.apps.data.digits import DigitsDataModule, load_digits_unit
from lightning_memwatch.apps.data.gmm import GMMDataModule, sample_two_gaussians

__all__ = [
    "CelebA32DataModule",
    "DigitsDataModule",
    "GMMDataModule",
    "TensorDataModule",
    "load_digits_unit",
    "normalize_unit_images",
    "sample_two_gaussians",
]

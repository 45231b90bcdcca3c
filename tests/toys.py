"""Tiny modules and data shared by the callback tests (importable as `toys`, see pytest's pythonpath)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


def toy_images(n: int = 64, seed: int = 0, shape=(1, 8, 8)) -> torch.Tensor:
    """``n`` distinct images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=gen) * 2 - 1


def toy_loader(images: torch.Tensor, batch_size: int = 16) -> DataLoader:
    labels = torch.zeros(len(images), dtype=torch.long)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)


class ToyDiffusion(LightningModule):
    """Samples far from the data before ``memorize_from`` optimizer steps, exact training copies after.

    ``quality`` (a fake FID, lower is better) falls until ``memorize_from`` then is flat, so detectors see
    a plateau. The sampler takes per-sample ``noise``: sample i is the same image at every evaluation.
    """

    def __init__(self, train: torch.Tensor, memorize_from: int = 20, lr: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("train_images", train.clone())
        self.layer = torch.nn.Linear(train[0].numel(), 1)
        self.memorize_from = memorize_from
        self.lr = lr
        self.sample_calls = 0

    def training_step(self, batch, batch_idx):
        x = batch[0].flatten(1)
        return self.layer(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def sample(self, num_samples: int, generator=None, noise=None) -> torch.Tensor:
        self.sample_calls += 1
        assert not self.training, "MemWatch must sample in eval mode"
        assert torch.is_inference_mode_enabled()
        if self.global_step < self.memorize_from:
            # far from every training image: tanh-squashed large noise has |x| ~ 1 everywhere
            return torch.sign(noise) * 0.999
        pick = (noise.flatten(1)[:, 0].abs() * 1e4).long() % len(self.train_images)
        return self.train_images[pick].clone()


def toy_labelled_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int = 16) -> DataLoader:
    """A loader of ``(image, label)`` batches (class-conditional training data)."""
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=True)


class ConditionalCopier(ToyDiffusion):
    """A class-conditional :class:`ToyDiffusion`: from ``memorize_from`` on, the samples asked for a class in
    ``copying`` are exact copies of that class's training images (picked by the sample's noise); every other
    sample stays far from the data. Records the labels of every sampler call in ``seen_labels``. ``copy_from``
    maps a generated class to the training class its copies come from (default: its own)."""

    def __init__(self, train, train_labels, copying=(3,), memorize_from: int = 20, copy_from=None) -> None:
        super().__init__(train, memorize_from=memorize_from)
        self.register_buffer("train_labels", train_labels.clone())
        self.copying = tuple(copying)
        self.copy_from = dict(copy_from or {})
        self.seen_labels: list[torch.Tensor] = []

    def sample(self, num_samples: int, generator=None, noise=None, labels=None) -> torch.Tensor:
        assert labels is not None and labels.dtype == torch.long and labels.shape == (num_samples,)
        self.seen_labels.append(labels.cpu())
        out = torch.sign(noise) * 0.999  # far from every training image
        if self.global_step >= self.memorize_from:
            for i, label in enumerate(labels.tolist()):
                if label in self.copying:
                    source = self.copy_from.get(label, label)
                    out[i] = self.train_images[copied_row(noise[i], self.train_labels, source)]
        return out


def copied_row(noise: torch.Tensor, train_labels: torch.Tensor, label: int) -> int:
    """The training row :class:`ConditionalCopier` copies for one sample's noise and class."""
    rows = (train_labels == label).nonzero().flatten()
    return int(rows[int(noise.flatten()[0].abs() * 1e4) % len(rows)])

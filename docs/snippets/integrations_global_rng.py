"""A sampler that draws its own noise from the global RNG: seeded per sample, training RNG untouched."""

import torch

from lightning_memwatch import MemWatch
from lightning_memwatch.adapters import GlobalRNGSampler


def my_sampler(model, num_samples: int) -> torch.Tensor:
    """Stands for your sampler: it calls torch.randn itself and takes no noise and no generator."""
    x = torch.randn(num_samples, 1, 8, 8)
    return torch.tanh(x + model.bias)  # images in [-1, 1]


# --8<-- [start:own_noise]
sample_fn = GlobalRNGSampler(lambda module, n: my_sampler(module, n))  # per_sample=True by default
watch = MemWatch(sample_fn=sample_fn, data_range=(-1.0, 1.0))
# lucidrains' own `sample` works the same way:
#   GlobalRNGSampler(lambda module, n: module.diffusion.sample(batch_size=n) * 2 - 1)
# --8<-- [end:own_noise]

"""Adapting a module whose sampler does not follow MemWatch's contract: pass `sample_fn`."""

from tutorial_module import TinyDiffusion

from lightning_memwatch import EvalSchedule, MemWatch


class PipelineModel(TinyDiffusion):
    """Stands for your model: its own sampler takes the initial noise and returns images in [0, 1]."""

    def generate(self, x_T):
        return (self.sample(len(x_T), noise=x_T) + 1) / 2


# --8<-- [start:adapter]
def sample_fn(module, num_samples, generator=None, noise=None):
    """MemWatch's sampler contract: `num_samples` images shaped and scaled like the training images.

    `noise` is the per-sample initial noise MemWatch draws (shape: one training image per row, unless you pass
    `MemWatch(noise_shape=...)`, e.g. a latent shape); `generator` is seeded per batch for any other randomness.
    Drop `noise` from the signature and MemWatch will not compute it.
    """
    images = module.generate(x_T=noise)  # your sampler, called your way
    return images * 2 - 1  # its [0, 1] output, back to the training data's [-1, 1]


watch = MemWatch(sample_fn=sample_fn, data_range=(-1.0, 1.0), num_samples=1000, schedule=EvalSchedule.every(500))
# --8<-- [end:adapter]

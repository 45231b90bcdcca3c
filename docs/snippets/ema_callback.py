"""Evaluating EMA weights kept by Lightning's EMAWeightAveraging callback."""

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_memwatch import EvalSchedule, MemWatch


# --8<-- [start:ema]
def ema_sampler(ema: EMAWeightAveraging):
    """A `sample_fn` that samples with the averaged weights `ema` keeps, at every MemWatch evaluation.

    EMAWeightAveraging swaps the averaged weights into the module only around validation (and copies them in
    at the end of training); MemWatch samples in `on_train_batch_end`, where the module holds the raw weights.
    The averaged copy of the module lives in `ema._average_model.module`: a private attribute of Lightning's
    WeightAveraging (as of Lightning 2.6; the docs' test suite checks it).
    """

    def sample_fn(module, num_samples, generator=None, noise=None):
        averaged = ema._average_model.module  # a copy of your LightningModule, with averaged weights
        averaged.to(module.device).eval()  # WeightAveraging may have created it before the module moved to GPU
        return averaged.sample(num_samples, generator=generator, noise=noise)

    return sample_fn


ema = EMAWeightAveraging(decay=0.999)
watch = MemWatch(sample_fn=ema_sampler(ema), schedule=EvalSchedule.every(500))
trainer = L.Trainer(callbacks=[ema, watch])  # `ema` first: it updates the average before MemWatch samples
# --8<-- [end:ema]

"""An adapter under Lightning's EMAWeightAveraging: the averaged weights are sampled, kept and restored."""

import lightning as L
from diffusers import DDIMScheduler
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_memwatch import MemorizationEarlyStopping, MemWatch
from lightning_memwatch.adapters import DiffusersSampler

# --8<-- [start:ema]
ema = EMAWeightAveraging()  # Lightning's own callback, its default decay
watch = MemWatch(  # weights="auto": the averaged weights are in the module while the adapter samples
    sample_fn=DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 50, data_range=(0.0, 1.0)),
    data_range=(0.0, 1.0),
)
stopper = MemorizationEarlyStopping(watch)  # keeps and restores the averaged weights that were scored
trainer = L.Trainer(callbacks=[ema, watch, stopper])
# --8<-- [end:ema]

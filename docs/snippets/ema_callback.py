"""Evaluating EMA weights kept by Lightning's EMAWeightAveraging callback."""

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch

# --8<-- [start:ema]
ema = EMAWeightAveraging(decay=0.999)
# weights="auto" (the default) finds `ema` among the Trainer's callbacks and scores its averaged weights
watch = MemWatch(schedule=EvalSchedule.every(500))
stopper = MemorizationEarlyStopping(watch)  # keeps and restores the averaged weights that were scored
trainer = L.Trainer(callbacks=[ema, watch, stopper])  # `ema` first: it updates the average before MemWatch samples
# --8<-- [end:ema]

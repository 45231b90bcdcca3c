"""MemWatch and MemorizationEarlyStopping under DDP: nothing changes but the Trainer's arguments."""

import lightning as L

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch


def ddp_trainer(accelerator="gpu", devices=4, max_steps=2_000_000):
    # --8<-- [start:ddp]
    watch = MemWatch(num_samples=10_000, sample_batch_size=500, schedule=EvalSchedule.paper())
    stopper = MemorizationEarlyStopping(watch, dirpath="checkpoints/memwatch")  # a folder every rank can read
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp", max_steps=max_steps,
                        callbacks=[watch, stopper])
    # --8<-- [end:ddp]
    return trainer, watch, stopper

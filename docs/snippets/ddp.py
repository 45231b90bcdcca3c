"""MemWatch and MemorizationEarlyStopping under DDP: nothing changes but the Trainer's arguments."""

import lightning as L

from lightning_memwatch import FID, EvalSchedule, MemorizationEarlyStopping, MemWatch


def ddp_trainer(
    heldout, accelerator="gpu", devices=4, max_steps=2_000_000, schedule=None, fid=None, num_samples=10_000
):
    fid = fid if fid is not None else FID(reference=heldout)  # Inception FID against held-out images
    schedule = schedule if schedule is not None else EvalSchedule.paper()
    # --8<-- [start:ddp]
    watch = MemWatch(num_samples=num_samples, sample_batch_size=500, schedule=schedule, fid=fid)
    stopper = MemorizationEarlyStopping(watch, dirpath="checkpoints/memwatch")  # a folder every rank can read
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy="ddp", max_steps=max_steps, callbacks=[watch, stopper]
    )
    # --8<-- [end:ddp]
    return trainer, watch, stopper

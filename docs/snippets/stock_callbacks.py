"""Lightning's own ModelCheckpoint and EarlyStopping on MemWatch's logged keys."""

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from lightning_memwatch import FID, EvalSchedule, MemWatch
from lightning_memwatch.log import F_MEM, FID_KEY


def stock_callbacks(heldout, eval_every=500, max_steps=100_000, **watch_kwargs):
    # --8<-- [start:stock]
    watch = MemWatch(schedule=EvalSchedule.every(eval_every, include_zero=True), fid=FID(reference=heldout),
                     **watch_kwargs)
    best_fid = ModelCheckpoint(monitor=FID_KEY, mode="min", every_n_train_steps=eval_every, save_top_k=1,
                               filename="best-fid-{step}")
    stop_on_copies = EarlyStopping(monitor=F_MEM, mode="min", divergence_threshold=0.01,  # f_mem > 1%: stop
                                   patience=1_000_000, check_on_train_epoch_end=True)
    trainer = L.Trainer(max_steps=max_steps, callbacks=[watch, best_fid, stop_on_copies])
    # --8<-- [end:stock]
    return trainer, watch, best_fid, stop_on_copies

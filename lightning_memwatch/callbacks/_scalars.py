"""How the callbacks log their scalars: to every logger on rank 0 at the step they belong to, and through
``pl_module.log`` on every rank so that stock callbacks (``EarlyStopping``, ``ModelCheckpoint``) can monitor them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import LightningModule, Trainer

__all__ = ["log_scalars"]


def log_scalars(
    trainer: Trainer, pl_module: LightningModule, values: Mapping[str, float], step: int, *, can_log: bool
) -> None:
    """Log ``values`` (``{key: number}``) of the evaluation or reading at ``step`` (optimizer steps).

    Loggers get them on rank 0 at ``step`` (the history's axis), whatever ``log_every_n_steps`` is;
    ``pl_module.log(logger=False)`` makes them monitorable on every rank. ``can_log`` is False in hooks where
    Lightning refuses ``pl_module.log`` (``on_train_start``, step 0): the monitor values are seeded in
    ``trainer.callback_metrics`` instead, so ``EarlyStopping(strict=True)`` finds them from the start.
    """
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics(dict(values), step=step)
    for key, value in values.items():
        if can_log:
            pl_module.log(key, float(value), on_step=True, on_epoch=False, logger=False, batch_size=1)
        else:
            trainer.callback_metrics[key] = torch.tensor(float(value))

"""What the callbacks read from the Trainer before training starts: the training loader."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Trainer

__all__ = ["train_loader_of"]


def train_loader_of(trainer: Trainer) -> Any | None:
    """The first training loader of the fit: the datamodule's, else the one given to ``trainer.fit`` or the
    module's ``train_dataloader`` hook; None when there is none. A list or dict of loaders gives its first.

    The loaders given to ``trainer.fit(...)`` are read through the fit loop's private ``_data_source``, because no
    public API holds them at ``setup``: ``trainer.train_dataloader`` is filled only by the fit loop's
    ``setup_data()``, after ``setup`` and ``on_fit_start``, and the module's hook is not set when loaders are
    passed to ``fit``. The callbacks need the training images at setup so that bad input fails before training
    starts, on every rank.
    """
    loader: Any = None
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and hasattr(datamodule, "train_dataloader"):
        loader = datamodule.train_dataloader()
    if loader is None:
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.is_defined():
            loader = source.dataloader()
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if isinstance(loader, Mapping) and loader:
        loader = next(iter(loader.values()))
    return loader

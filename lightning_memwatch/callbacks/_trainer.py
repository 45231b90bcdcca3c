"""What the callbacks read from the Trainer: before training starts, the training loader and the datamodule's
conventions (``data_range``, ``train_images()``, ``reference_images()``, ``heldout_images()``); at an epoch's
end, whether the fit ends with it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Trainer

__all__ = [
    "data_range_of",
    "datamodule_of",
    "fit_ends_with_this_epoch",
    "heldout_images_of",
    "reference_images_of",
    "train_images_of",
    "train_loader_of",
]


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


# -- the datamodule conventions -------------------------------------------------------------------------------
# A datamodule (or, for data_range, the module) may announce what the callbacks need. These are the only readers
# of those names: `data_range`, `train_images()`, `reference_images()` (held-out images, the FID reference) and
# `heldout_images()`.


def datamodule_of(trainer: Trainer | None) -> Any | None:
    """The trainer's datamodule, or None."""
    return getattr(trainer, "datamodule", None)


def _call(owner: Any, name: str) -> Any | None:
    method = getattr(owner, name, None)
    return method() if callable(method) else None


def data_range_of(trainer: Trainer | None, pl_module: Any) -> Any | None:
    """The ``data_range`` attribute of the datamodule, else of the module (unchecked), or None."""
    for owner in (datamodule_of(trainer), pl_module):
        value = getattr(owner, "data_range", None)
        if value is not None:
            return value
    return None


def train_images_of(trainer: Trainer | None) -> Any | None:
    """The datamodule's ``train_images()`` (the training images without labels or augmentation), or None."""
    return _call(datamodule_of(trainer), "train_images")


def reference_images_of(trainer: Trainer | None) -> Any | None:
    """The datamodule's ``reference_images()`` (held-out images: the FID reference), or None."""
    return _call(datamodule_of(trainer), "reference_images")


def heldout_images_of(trainer: Trainer | None) -> Any | None:
    """Held-out images: the datamodule's ``reference_images()``, else its ``heldout_images()``, or None."""
    found = reference_images_of(trainer)
    return found if found is not None else _call(datamodule_of(trainer), "heldout_images")


def datamodule_labels_of(trainer: Trainer | None, name: str) -> Any | None:
    """The datamodule's ``train_labels()`` or ``heldout_labels()`` (``name``): the classes of the images its
    ``train_images()`` or held-out images return, or None."""
    return _call(datamodule_of(trainer), name)


def fit_ends_with_this_epoch(trainer: Trainer) -> bool:
    """In ``on_train_epoch_end``: whether training ends after this epoch (``trainer.should_stop``, ``max_steps``
    reached, or the last of ``max_epochs``), read from the public Trainer attributes the fit loop tests. True
    also when ``min_steps``/``min_epochs`` will override a ``should_stop``."""
    if trainer.should_stop:
        return True
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs

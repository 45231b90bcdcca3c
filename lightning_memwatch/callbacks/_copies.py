"""MemWatch's view of the copied training images: what each evaluation copied, and where the table goes
(a TensorBoard text table, an image strip, the CSV beside the checkpoints). The table itself lives in
:mod:`lightning_memwatch.copies`."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from lightning_memwatch import log as mwlog
from lightning_memwatch.copies import CSV_NAME, CopyTable
from lightning_memwatch.metrics.memorization import MemorizationResult

__all__ = ["COPIES_IMAGE", "COPIES_TEXT", "copied_rows", "csv_path", "log_copies", "write_csv"]

COPIES_TEXT = "memwatch/copied_training_images"
"""TensorBoard text tag of the most-copied training images (a Markdown table, logged when an evaluation copies)."""
COPIES_IMAGE = "memwatch/copied_training_images_strip"
"""TensorBoard image tag: the most-copied training images (below) and their copy at this evaluation (above)."""
_STRIP_ROWS = 16


def copied_rows(result: MemorizationResult) -> list[tuple[int, int]]:
    """``(sample index, nearest training row)`` of every memorized sample of ``result``, in sample order."""
    picked = result.memorized.nonzero().flatten().cpu()
    rows = result.nn_indices[:, 0].cpu()[picked]
    return list(zip(picked.tolist(), rows.tolist(), strict=True))


def log_copies(
    trainer: Trainer,
    table: CopyTable,
    step: int,
    copies: list[tuple[int, int]],
    generated: Tensor | None,
    nearest: Tensor | None,
    ratios: Tensor | None,
    data_range: tuple[float, float],
    threshold: float,
) -> None:
    """On rank 0 after an evaluation that copied: the table's top rows as text, and (when the images are at
    hand, i.e. with ``log_images``) the most-copied rows copied now, each training image under its copy."""
    if not copies or not trainer.loggers:
        return
    classes = table.copying_classes(step)  # the classes whose training images were copied at this step
    named = ", ".join(f"class {k} ({count} image{'s' * (count > 1)})" for k, count in classes.items())
    head = f"Copied at step {step}: {named}.\n\n" if named else ""
    mwlog.log_text(trainer, COPIES_TEXT, head + table.to_markdown(), step)
    writers = mwlog.tensorboard_writers(trainer)
    if generated is None or nearest is None or ratios is None or not writers or generated.ndim != 4:
        return
    if generated.shape[1] not in (1, 3):
        return
    latest: dict[int, int] = {row: sample for sample, row in copies}  # the last sample that copied each row
    order = [r.train_index for r in table.rows() if r.train_index in latest][:_STRIP_ROWS]
    samples = torch.as_tensor([latest[row] for row in order], dtype=torch.long)
    strip = mwlog.pair_grid(
        mwlog.to_unit_range(generated[samples.to(generated.device)], data_range),
        mwlog.to_unit_range(nearest[samples.to(nearest.device)], data_range),
        ratios.detach().float().cpu()[samples],
        threshold,
    )
    for writer in writers:
        writer.add_image(COPIES_IMAGE, strip, global_step=step, dataformats="HWC")
        writer.flush()


def csv_path(trainer: Trainer) -> Path:
    """Where the table is written at the end of fit: the checkpoint callback's ``dirpath`` (beside the
    checkpoints), else the trainer's ``log_dir``, else its ``default_root_dir``."""
    callback = getattr(trainer, "checkpoint_callback", None)
    directory = getattr(callback, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
    return Path(os.fspath(directory)) / CSV_NAME


def write_csv(trainer: Trainer, table: CopyTable) -> Path | None:
    """Write the table as CSV (global rank 0, when it holds a row); its path, or None when nothing was written.
    Called on every rank."""
    if not len(table):
        return None
    path = csv_path(trainer)  # `trainer.log_dir` is a collective: every rank gets here (the tables agree)
    if not trainer.is_global_zero:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(table.to_csv())
    os.replace(tmp, path)
    return path

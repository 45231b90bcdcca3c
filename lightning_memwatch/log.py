"""Logged keys (constants) and TensorBoard images, histograms and text, with a fallback note for other loggers.

Scalars are logged by MemWatch through ``pl_module.log`` so stock ``EarlyStopping``/``ModelCheckpoint``
can monitor them; everything here runs on global rank 0 only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

__all__ = [
    "F_MEM",
    "F_MEM_CI_LOW",
    "F_MEM_CI_HIGH",
    "RATIO_MEDIAN",
    "FID_KEY",
    "FID_NUM_SAMPLES",
    "TAU_GEN",
    "TAU_MEM",
    "SAMPLES_IMAGE",
    "PAIRS_IMAGE",
    "RATIO_HISTOGRAM",
    "TIMESCALE_TEXT",
    "SCALAR_KEYS",
    "log_images",
    "log_text",
    "tensorboard_writers",
]

PREFIX = "memwatch/"
F_MEM = "memwatch/f_mem"
F_MEM_CI_LOW = "memwatch/f_mem_ci_low"
F_MEM_CI_HIGH = "memwatch/f_mem_ci_high"
RATIO_MEDIAN = "memwatch/ratio_median"
FID_KEY = "memwatch/fid"
FID_NUM_SAMPLES = "memwatch/fid_num_samples"
TAU_GEN = "memwatch/tau_gen"
TAU_MEM = "memwatch/tau_mem"
SAMPLES_IMAGE = "memwatch/generated"
PAIRS_IMAGE = "memwatch/generated_vs_nearest_train"
RATIO_HISTOGRAM = "memwatch/nn_ratio"
TIMESCALE_TEXT = "memwatch/timescales"

#: record field -> logged scalar key
SCALAR_KEYS: dict[str, str] = {
    "f_mem": F_MEM,
    "f_mem_ci_low": F_MEM_CI_LOW,
    "f_mem_ci_high": F_MEM_CI_HIGH,
    "ratio_median": RATIO_MEDIAN,
    "fid": FID_KEY,
    "fid_num_samples": FID_NUM_SAMPLES,
}

_warned_no_tensorboard: set[int] = set()


def _writers(trainer: Trainer) -> list[object]:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def tensorboard_writers(trainer: Trainer) -> list[object]:
    """SummaryWriters of the trainer's TensorBoard loggers; a one-time note when there are other loggers only."""
    writers = _writers(trainer)
    if not writers and trainer.loggers and id(trainer) not in _warned_no_tensorboard:
        _warned_no_tensorboard.add(id(trainer))
        rank_zero_info(
            "MemWatch: scalars go to every logger, but sample grids, nearest-neighbour pairs and ratio "
            "histograms need a TensorBoardLogger (add `lightning.pytorch.loggers.TensorBoardLogger`)."
        )
    return writers


def to_unit_range(images: Tensor, data_range: Sequence[float]) -> Tensor:
    """Map images from ``data_range`` to [0, 1] for display (clamped)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def _grid(images: Tensor, nrow: int) -> Tensor:
    from torchvision.utils import make_grid

    return make_grid(images.cpu(), nrow=nrow, padding=1, pad_value=1.0)


def log_images(
    trainer: Trainer,
    step: int,
    generated: Tensor,
    ratios: Tensor,
    nearest_train: Tensor,
    data_range: Sequence[float],
    *,
    max_images: int = 64,
    max_pairs: int = 16,
) -> None:
    """Sample grid, generated-vs-nearest-train pairs (lowest ratios first) and the ratio histogram.

    ``nearest_train`` holds, for each generated sample, its nearest training image (same order).
    """
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    ratios = ratios.detach().float().cpu()
    can_draw = generated.ndim == 4 and generated.shape[1] in (1, 3)
    grid = pairs = None
    if can_draw:
        shown = to_unit_range(generated[:max_images], data_range)
        grid = _grid(shown, nrow=int(max(1, len(shown) ** 0.5)))
        order = torch.argsort(ratios)[:max_pairs]
        gen_sel = to_unit_range(generated[order.to(generated.device)], data_range)
        train_sel = to_unit_range(nearest_train[order.to(nearest_train.device)], data_range)
        # Column pairs: generated on the top row, its nearest training image under it.
        pairs = _grid(torch.cat([gen_sel.cpu(), train_sel.cpu()]), nrow=len(order))
    for writer in writers:
        if grid is not None:
            writer.add_image(SAMPLES_IMAGE, grid, global_step=step)
            writer.add_image(PAIRS_IMAGE, pairs, global_step=step)
        writer.add_histogram(RATIO_HISTOGRAM, ratios.numpy(), global_step=step)
        writer.flush()


def log_text(trainer: Trainer, tag: str, text: str, step: int) -> None:
    """A text event in TensorBoard (no-op for other loggers)."""
    for writer in _writers(trainer):
        writer.add_text(tag, text, global_step=step)
        writer.flush()

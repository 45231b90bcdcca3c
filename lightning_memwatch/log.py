"""Logged keys (constants), and the images, histograms, text and settings MemWatch sends to each logger.

Scalars go to every logger (``logger.log_metrics``) and through ``pl_module.log`` so stock
``EarlyStopping``/``ModelCheckpoint`` can monitor them. Images go through each logger's own image API where it
has one:

| logger | sample grid, pair grid | ratio histogram | timescale text |
|---|---|---|---|
| ``TensorBoardLogger`` | ``add_image`` | ``add_histogram`` | ``add_text`` |
| ``WandbLogger`` | ``log_image`` | ``wandb.Histogram`` | run summary |
| ``MLFlowLogger`` | ``MlflowClient.log_image`` (key and step) | (none) | run tag |
| others (``CSVLogger``, ...) | (none: a one-time note) | (none) | (none) |

MemWatch's settings join the run's one hparams session (:mod:`lightning_memwatch.hparams`); its TensorBoard
CUSTOM SCALARS layout lives in :mod:`lightning_memwatch.tensorboard_layout`. Everything here runs on global
rank 0 only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

# the scalar keys live with the record they are logged from (lightning_memwatch.record); re-exported here
# (PREFIX and FID_TRAIN_FLOOR too, importable here but outside __all__, whose strings are the documented keys)
from lightning_memwatch.record import (
    F_MEM,
    F_MEM_CI_HIGH,
    F_MEM_CI_LOW,
    FID_KEY,
    FID_NUM_SAMPLES,
    FID_TRAIN_FLOOR,  # noqa: F401 (re-exported)
    ONSET_FORECAST,
    ONSET_FORECAST_HIGH,
    ONSET_FORECAST_LOW,
    PREFIX,  # noqa: F401 (re-exported)
    RATIO_MEDIAN,
    SCALAR_KEYS,
    TAU_GEN,
    TAU_MEM,
)

__all__ = [
    "F_MEM",
    "F_MEM_CI_LOW",
    "F_MEM_CI_HIGH",
    "RATIO_MEDIAN",
    "FID_KEY",
    "FID_NUM_SAMPLES",
    "TAU_GEN",
    "TAU_MEM",
    "ONSET_FORECAST",
    "ONSET_FORECAST_LOW",
    "ONSET_FORECAST_HIGH",
    "SAMPLES_IMAGE",
    "PAIRS_IMAGE",
    "PAIRS_CAPTION",
    "RATIO_HISTOGRAM",
    "TIMESCALE_TEXT",
    "SCALAR_KEYS",
    "memwatch_settings",
    "log_images",
    "log_text",
    "pair_caption",
    "pair_grid",
    "sample_grid",
    "tensorboard_writers",
]

SAMPLES_IMAGE = "memwatch/generated"
PAIRS_IMAGE = "memwatch/generated_vs_nearest_train"
PAIRS_CAPTION = "memwatch/generated_vs_nearest_train_legend"
RATIO_HISTOGRAM = "memwatch/nn_ratio"
TIMESCALE_TEXT = "memwatch/timescales"

_noted: set[tuple[int, str]] = set()
_PAIRS_PER_ROW = 8
_MIN_TILE_PX = 64  # small images are upscaled (nearest neighbour, no smoothing) to at least this size
_LABEL_PX = 16  # smallest font size (pixels)
# TensorBoard's Time Series shows an image inside a box of about 370 x 210 px at its default card width (CSS
# `object-fit: contain`): the pair grid's text is sized so that it stays >= 12.5 px once the image fits that box
_CARD_BOX_PX = (370, 210)
_MIN_SHOWN_TEXT_PX = 12.5
_MEMORIZED_RGB = (200, 0, 0)


def _note_once(trainer: Trainer, what: str, text: str) -> None:
    key = (id(trainer), what)
    if key not in _noted:
        _noted.add(key)
        rank_zero_info(text)


def _writers(trainer: Trainer) -> list[Any]:
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def _has_image_api(lg: Logger) -> bool:
    return isinstance(lg, (TensorBoardLogger, WandbLogger, MLFlowLogger))


def tensorboard_writers(trainer: Trainer) -> list[Any]:
    """SummaryWriters of the trainer's TensorBoard loggers."""
    return _writers(trainer)


def to_unit_range(images: Tensor, data_range: Sequence[float]) -> Tensor:
    """Map images from ``data_range`` to [0, 1] for display (clamped)."""
    lo, hi = float(data_range[0]), float(data_range[1])
    return ((images.float() - lo) / (hi - lo)).clamp(0.0, 1.0)


def _upscale_factor(height: int, width: int, min_px: int = _MIN_TILE_PX) -> int:
    return max(1, math.ceil(min_px / max(1, max(height, width))))


def _to_rgb_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [0, 1], C in (1, 3) -> (N, H, W, 3) uint8."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.permute(0, 2, 3, 1).numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def _upscaled(tiles: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscaling of (N, H, W, 3) by an integer factor: every pixel becomes a block."""
    return tiles.repeat(factor, axis=1).repeat(factor, axis=2) if factor > 1 else tiles


def sample_grid(images: Tensor, max_images: int = 64) -> np.ndarray:
    """A square-ish grid (H, W, 3) uint8 of the first ``max_images`` images (N, C, H, W) in [0, 1].

    Images smaller than 64 pixels are upscaled by an integer factor without smoothing, so an 8x8 digit shows
    its pixels rather than a blur or a dot.
    """
    shown = images[:max_images]
    tiles = _to_rgb_uint8(shown)
    tiles = _upscaled(tiles, _upscale_factor(*shown.shape[2:]))
    n, th, tw, _ = tiles.shape
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    pad = 2
    canvas = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (th + pad), pad + c * (tw + pad)
        canvas[y : y + th, x : x + tw] = tiles[i]
    return canvas


def _threshold_text(threshold: float) -> str:
    return "1/3" if abs(threshold - 1 / 3) < 1e-9 else f"{threshold:.3g}"


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a TrueType font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def pair_grid(
    generated: Tensor, nearest_train: Tensor, ratios: Tensor, threshold: float | None = None
) -> np.ndarray:
    """Generated samples over their nearest training images, with a legend and the ratio d1/d2 of each pair.

    Pairs are shown in the order given (MemWatch passes them most-memorized first, lowest ratio first), eight
    per row group: the generated sample on top, its nearest training image under it, and ``d1/d2`` below the
    pair (in red, the pair framed in red, when it is under ``threshold``). A header row says what is shown and
    names the threshold; the first column labels the rows (``generated``, ``nearest training image``,
    ``d1/d2``). Images smaller than 64 pixels are upscaled by an integer factor without smoothing. The text is
    sized so that it stays at least 12.5 pixels high when TensorBoard fits the whole image into an image card
    of its default size (about 370 x 210 pixels).

    Args:
        generated: (K, C, H, W) samples in [0, 1], C in (1, 3).
        nearest_train: (K, C, H, W) their nearest training images, same order.
        ratios: (K,) nearest-neighbour ratios d1/d2 of the samples.
        threshold: memorization threshold; pairs below it are marked.

    Returns:
        (H, W, 3) uint8 image.
    """
    from PIL import Image, ImageDraw

    k = len(generated)
    gen, train = _to_rgb_uint8(generated), _to_rgb_uint8(nearest_train)
    factor = _upscale_factor(*generated.shape[2:])
    gen, train = _upscaled(gen, factor), _upscaled(train, factor)
    th, tw = gen.shape[1:3]
    cols = max(1, min(_PAIRS_PER_ROW, k))
    groups = max(1, int(math.ceil(k / cols)))
    pad, gap = max(4, tw // 10), 2
    row_labels = ("generated", "nearest training image", "d1/d2")
    header = "most copied first" + (
        f"; red: d1/d2 < {_threshold_text(threshold)}, a copy" if threshold is not None else ""
    )
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def geometry(size: int) -> tuple[Any, int, int, int, int, int]:
        font = _font(size)
        label_w = int(max(measure.textlength(w, font=font) for w in ("generated", "nearest", "training image")))
        width = max(pad + label_w + pad + cols * (tw + pad), int(measure.textlength(header, font=font)) + 2 * pad)
        line = int(math.ceil(size * 1.25))
        text_h = max(th, 2 * line)  # "nearest" / "training image" on two lines beside a tile
        cell_h = th + gap + text_h + line + pad
        return font, label_w, width, pad + line + pad + groups * cell_h, line, text_h

    # the smallest font that stays readable once the whole image is fitted into a TensorBoard card
    size = _LABEL_PX
    while True:
        font, label_w, width, height, line, text_h = geometry(size)
        shown = size * min(_CARD_BOX_PX[0] / width, _CARD_BOX_PX[1] / height)
        if shown >= _MIN_SHOWN_TEXT_PX or size >= 8 * _LABEL_PX * max(1, th // 64):  # (a cap, never reached)
            break
        size += 1
    cell_h = th + gap + text_h + line + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), header, fill=(0, 0, 0), font=font)
    values = ratios.detach().double().cpu().tolist()
    x0 = pad + label_w + pad
    for g in range(groups):
        y = pad + line + pad + g * cell_h
        y_train = y + th + gap
        y_ratio = y_train + text_h
        draw.text((pad, y + (th - line) // 2), row_labels[0], fill=(0, 0, 0), font=font)
        draw.text((pad, y_train), "nearest", fill=(0, 0, 0), font=font)
        draw.text((pad, y_train + line), "training image", fill=(0, 0, 0), font=font)
        draw.text((pad, y_ratio), row_labels[2], fill=(0, 0, 0), font=font)
        for c in range(cols):
            i = g * cols + c
            if i >= k:
                break
            x = x0 + c * (tw + pad)
            canvas.paste(Image.fromarray(gen[i]), (x, y))
            canvas.paste(Image.fromarray(train[i]), (x, y_train))
            copy = threshold is not None and values[i] < threshold
            if copy:
                draw.rectangle((x - 2, y - 2, x + tw + 1, y_train + th + 1), outline=_MEMORIZED_RGB, width=2)
            draw.text((x, y_ratio), f"{values[i]:.2f}", fill=_MEMORIZED_RGB if copy else (0, 0, 0), font=font)
    return np.asarray(canvas)


def pair_caption(k: int, threshold: float | None) -> str:
    """The legend of :func:`pair_grid`'s image, as a sentence (a TensorBoard text entry, a W&B caption)."""
    mark = (
        f" A pair is a copy (red) when d1/d2 < {_threshold_text(threshold)}: the generated sample is at least "
        f"{1 / threshold:.3g} times closer to its nearest training image than to the second nearest."
        if threshold is not None
        else ""
    )
    return (
        f"The {k} generated samples closest to copying (lowest d1/d2 first): each generated sample (top) over its "
        f"nearest training image (bottom), with d1/d2, its distance to the nearest training image over the "
        f"distance to the second nearest, under the pair.{mark}"
    )


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
    threshold: float | None = None,
) -> None:
    """Sample grid, generated-vs-nearest-train pairs (lowest ratios first) and the ratio histogram, to every
    logger with an image API (TensorBoard, Weights & Biases, MLflow); a one-time note for the others.

    ``nearest_train`` holds, for each generated sample, its nearest training image (same order).
    """
    loggers = list(trainer.loggers)
    others = [type(lg).__name__ for lg in loggers if not _has_image_api(lg)]
    if others:
        _note_once(
            trainer,
            "no-image-api",
            f"MemWatch: scalars go to every logger; {', '.join(sorted(set(others)))} has no image API, so sample "
            "grids, nearest-neighbour pairs and ratio histograms go only to TensorBoard, Weights & Biases or "
            "MLflow loggers (add one to the Trainer's `logger=[...]` to see them).",
        )
    targets = [lg for lg in loggers if _has_image_api(lg)]
    if not targets:
        return
    ratios = ratios.detach().float().cpu()
    grid = pairs = None
    if generated.ndim == 4 and generated.shape[1] in (1, 3):
        grid = sample_grid(to_unit_range(generated[:max_images], data_range), max_images)
        order = torch.argsort(ratios, stable=True)[:max_pairs]
        pairs = pair_grid(
            to_unit_range(generated[order.to(generated.device)], data_range),
            to_unit_range(nearest_train[order.to(nearest_train.device)], data_range),
            ratios[order],
            threshold,
        )
    caption = pair_caption(0 if pairs is None else min(max_pairs, len(ratios)), threshold)
    for lg in targets:
        if isinstance(lg, TensorBoardLogger):
            writer = lg.experiment
            if grid is not None:
                writer.add_image(SAMPLES_IMAGE, grid, global_step=step, dataformats="HWC")
                writer.add_image(PAIRS_IMAGE, pairs, global_step=step, dataformats="HWC")
                writer.add_text(PAIRS_CAPTION, caption, global_step=step)
            writer.add_histogram(RATIO_HISTOGRAM, ratios.numpy(), global_step=step)
            writer.flush()
        elif isinstance(lg, WandbLogger):
            import wandb

            if grid is not None:
                lg.log_image(key=SAMPLES_IMAGE, images=[grid], step=step, caption=[f"step {step}"])
                lg.log_image(key=PAIRS_IMAGE, images=[pairs], step=step, caption=[caption])
            lg.log_metrics({RATIO_HISTOGRAM: wandb.Histogram(ratios.numpy())}, step=step)  # type: ignore[dict-item]
        elif isinstance(lg, MLFlowLogger) and grid is not None:
            client = lg.experiment
            client.log_image(lg.run_id, grid, key=SAMPLES_IMAGE, step=step)
            client.log_image(lg.run_id, pairs, key=PAIRS_IMAGE, step=step)
            client.set_tag(lg.run_id, PAIRS_CAPTION, caption)  # the legend (the same at every step)


def log_text(trainer: Trainer, tag: str, text: str, step: int) -> None:
    """A text event: TensorBoard text, a Weights & Biases summary entry, an MLflow run tag (others: no-op).

    W&B and MLflow keep one value per key, so successive texts are appended, one line each.
    """
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_text(tag, text, global_step=step)
            lg.experiment.flush()
        elif isinstance(lg, WandbLogger):
            summary = lg.experiment.summary
            previous = summary.get(tag)
            summary[tag] = f"{previous}\n{text}" if previous else text
        elif isinstance(lg, MLFlowLogger):
            client = lg.experiment
            previous = client.get_run(lg.run_id).data.tags.get(tag)
            client.set_tag(lg.run_id, tag, f"{previous}\n{text}" if previous else text)


# ------------------------------------------------------------------------------------------------- settings


def memwatch_settings(watch: Any) -> dict[str, Any]:
    """Deprecated: use ``watch.hparams()`` (:meth:`lightning_memwatch.MemWatch.hparams`)."""
    from lightning_memwatch._deprecation import deprecate

    deprecate("lightning_memwatch.log.memwatch_settings(watch) is deprecated: call watch.hparams() instead.")
    return dict(watch.hparams())

"""TensorBoard's CUSTOM SCALARS layout of a MemWatch run: the moment of copying on four charts.

MemWatch registers the layout once per fit (``on_fit_start``, rank 0) in every TensorBoard logger's run, and
after each evaluation logs the guide lines the charts draw next to its scalars (TensorBoard only: they carry
no measurement, so no other logger gets them):

* f_mem and its confidence interval: ``memwatch/f_mem`` within ``memwatch/f_mem_ci_low`` and
  ``memwatch/f_mem_ci_high``;
* the tau_mem rule against its threshold: the value it tests (``memwatch/f_mem_ci_low`` or ``memwatch/f_mem``)
  and ``memwatch/guides/f0``;
* sample quality against its floors: ``memwatch/fid`` (or the detector's quality metric),
  ``memwatch/guides/fid_train_floor`` and ``memwatch/guides/gen_floor``;
* tau_gen and tau_mem as marked steps: ``memwatch/guides/tau_gen`` and ``memwatch/guides/tau_mem``, 0 at
  every evaluation before the event was flagged and 1 from the evaluation that flagged it on.

Open it with smoothing off (TensorBoard smooths by 0.6 by default, which bends f_mem and its interval):
:func:`dashboard_url`, e.g. ``http://127.0.0.1:6006/#custom_scalars&_smoothingWeight=0``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_memwatch.record import (
    F_MEM,
    F_MEM_CI_HIGH,
    F_MEM_CI_LOW,
    FID_KEY,
    FID_TRAIN_FLOOR,
    PREFIX,
    SCALAR_KEYS,
    TAU_GEN,
    TAU_MEM,
)

if TYPE_CHECKING:  # pragma: no cover
    from lightning_memwatch.callbacks.memwatch import MemWatch
    from lightning_memwatch.detection import TimescaleDetector

__all__ = [
    "CATEGORY",
    "F0_LINE",
    "FID_FLOOR_LINE",
    "GEN_FLOOR_LINE",
    "TAU_GEN_MARK",
    "TAU_MEM_MARK",
    "dashboard_url",
    "hparams_metrics",
    "layout",
    "log_guides",
    "register",
]

CATEGORY = "memwatch: when copying starts"
F0_LINE = "memwatch/guides/f0"
"""The detector's ``f0`` at every evaluation: the line the tau_mem rule's value crosses."""
FID_FLOOR_LINE = "memwatch/guides/fid_train_floor"
"""FID of the training images against the reference, at every evaluation: the level real data reaches."""
GEN_FLOOR_LINE = "memwatch/guides/gen_floor"
"""The quality the tau_gen rule waits for (its ``floor``), at every evaluation, when it has one."""
TAU_GEN_MARK = "memwatch/guides/tau_gen"
"""0 at every evaluation before tau_gen was flagged, 1 from the evaluation that flagged it."""
TAU_MEM_MARK = "memwatch/guides/tau_mem"
"""0 at every evaluation before tau_mem was flagged, 1 from the evaluation that flagged it."""

_TESTED = {"ci": F_MEM_CI_LOW, "threshold": F_MEM}  # the key each tau_mem rule compares with f0


def _quality_tag(detector: TimescaleDetector) -> str:
    key = detector.quality_key
    return FID_KEY if key == "fid" else f"{PREFIX}{key}"


def layout(detector: TimescaleDetector) -> dict[str, dict[str, list[Any]]]:
    """The layout (``SummaryWriter.add_custom_scalars`` format) for a watch with this detector."""
    tested = _TESTED[detector.mem_rule]
    quality = _quality_tag(detector)
    return {
        CATEGORY: {
            "f_mem (fraction of samples copied) within its confidence interval": [
                "Margin",
                [F_MEM, F_MEM_CI_LOW, F_MEM_CI_HIGH],
            ],
            f"tau_mem rule: {tested.removeprefix(PREFIX)} against f0 (the threshold it must exceed)": [
                "Multiline",
                [f"^{tested}$", f"^{F0_LINE}$"],
            ],
            f"{quality.removeprefix(PREFIX)} against its floors (training images' FID; tau_gen's floor)": [
                "Multiline",
                [f"^{quality}$", f"^{FID_FLOOR_LINE}$", f"^{GEN_FLOOR_LINE}$"],
            ],
            "tau_gen and tau_mem: 1 from the evaluation that flagged them": [
                "Multiline",
                [f"^{TAU_GEN_MARK}$", f"^{TAU_MEM_MARK}$"],
            ],
        }
    }


def hparams_metrics(watch: MemWatch) -> list[str]:
    """The scalar tags TensorBoard's HPARAMS tab lists as metrics of a MemWatch run."""
    tags = [tag for tag in SCALAR_KEYS.values() if watch.fid is not None or not tag.startswith(FID_KEY)]
    tags += [f"{PREFIX}{name}" for name in watch.metrics]
    tags += [TAU_GEN, TAU_MEM] + ([FID_TRAIN_FLOOR] if watch.fid is not None else [])
    return tags


def register(trainer: Trainer, watch: MemWatch) -> None:
    """Write the layout into each TensorBoard logger's run (rank 0, once per fit)."""
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            lg.experiment.add_custom_scalars(layout(watch.detector))


def log_guides(trainer: Trainer, watch: MemWatch, step: int) -> None:
    """The guide lines of the layout at one evaluation step (optimizer steps), to TensorBoard loggers."""
    writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
    if not writers:
        return
    detector = watch.detector
    values = {
        F0_LINE: detector.f0,
        TAU_GEN_MARK: float(detector.tau_gen is not None),
        TAU_MEM_MARK: float(detector.tau_mem is not None),
    }
    if watch.fid_train_floor is not None:
        values[FID_FLOOR_LINE] = watch.fid_train_floor
    if detector.gen_rule == "floor" and detector.floor is not None:
        values[GEN_FLOOR_LINE] = detector.floor
    for writer in writers:
        for tag, value in values.items():
            writer.add_scalar(tag, float(value), global_step=step)
        writer.flush()


def dashboard_url(port: int = 6006, host: str = "127.0.0.1") -> str:
    """The CUSTOM SCALARS dashboard of a local TensorBoard, smoothing off."""
    return f"http://{host}:{port}/#custom_scalars&_smoothingWeight=0"

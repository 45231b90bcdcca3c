"""MemorizationEarlyStopping: stop training at tau_mem and keep the best weights of the generalization window.

The paper's window [tau_gen, tau_mem) is where a diffusion model generates good samples without copying its
training set. This callback listens to a :class:`~lightning_memwatch.MemWatch` (no sampling of its own), keeps
the best weights by sample quality (FID by default) among the evaluations inside the window, stops training
when tau_mem is flagged, and puts the kept weights back into the module when training ends.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_memwatch.detection import _finite_float

if TYPE_CHECKING:  # pragma: no cover
    from lightning_memwatch.callbacks.memwatch import MemWatch

__all__ = ["MemorizationEarlyStopping", "MemorizationStoppingReason"]

_MODES = ("min", "max")
BEST_FILENAME = "memwatch_best_in_window.pt"


class MemorizationStoppingReason(Enum):
    """Why :class:`MemorizationEarlyStopping` stopped training."""

    NOT_STOPPED = 0
    MEMORIZATION = 1  # tau_mem was flagged (and patience, if any, was exhausted)


class MemorizationEarlyStopping(Callback):
    """Stop at tau_mem and end fit with the best weights of the generalization window [tau_gen, tau_mem).

    Add it next to the :class:`~lightning_memwatch.MemWatch` it listens to. After every evaluation of the
    watch (on every rank, once the watch's detector has consumed the record) it:

    1. keeps a copy of the module's weights when the evaluation lies in the window (tau_gen flagged at or
       before it, tau_mem not flagged, f_mem not significant at this evaluation) and its quality ``monitor``
       beats the best so far;
    2. signals ``trainer.should_stop`` once tau_mem is flagged and the memorization condition has held for
       ``patience`` consecutive evaluations (0 or 1: at the evaluation that flags tau_mem). The decision is
       reduced across ranks with ``trainer.strategy.reduce_boolean_decision`` (any rank stops all). The
       Trainer's own ``min_steps`` is honoured by Lightning: training continues until it is reached.

    When training ends (``on_train_end``) after tau_mem was flagged, ``restore_best`` loads the kept weights
    into the module, so the module returned by ``trainer.fit`` is the best in-window model. If tau_mem never
    fires nothing stops and the final weights stay. If no evaluation fell in the window (tau_gen never
    flagged, or tau_mem came first: the model memorizes before it generalizes) a warning says so and the
    weights stay.

    Example:
        >>> from lightning_memwatch import MemWatch, MemorizationEarlyStopping
        >>> watch = MemWatch(num_samples=1000)
        >>> stopper = MemorizationEarlyStopping(watch, monitor="val_loss", strict=False)
        >>> stopper.stopping_reason
        <MemorizationStoppingReason.NOT_STOPPED: 0>

    Args:
        watch: the :class:`~lightning_memwatch.MemWatch` whose flags drive the callback; it must also be in
            ``Trainer(callbacks=...)``.
        patience: consecutive evaluations at which the tau_mem condition (the watch detector's
            ``is_memorizing``) must hold before stopping, counting the one that flags tau_mem; 0 and 1 stop at
            that evaluation, as in Lightning's ``EarlyStopping``. It does not move tau_mem itself (set the
            detector's own ``patience`` for that) nor the window of kept weights.
        restore_best: load the best in-window weights into the module when training ends after tau_mem.
        verbose: log a line on rank 0 at each new best, at the stop and at the restore.
        strict: raise when the first evaluation's record has no ``monitor`` value (e.g. FID off and no quality
            metric given), since no best weights could be kept; with ``strict=False`` warn once and only stop
            at tau_mem.
        dirpath: directory for the best in-window weights, written by global rank 0 as
            ``memwatch_best_in_window.pt`` (``torch.save`` of ``{"state_dict", "step", "score", "monitor"}``)
            and read back by every rank (so it must be visible to all ranks, as for ``ModelCheckpoint``). None
            keeps a CPU copy in memory on each rank instead, which is also saved in this callback's
            checkpoint state so that a resumed run can still restore it (about the model's size).
        monitor: record key of the quality used to pick the best weights; default the watch detector's
            ``quality_key`` (``"fid"``). Any metric the watch merges into its records works.
        mode: ``"min"`` (lower is better) or ``"max"``; default the detector's ``quality_mode`` (``"min"``).

    Attributes:
        best_step: step (optimizer steps) of the best in-window evaluation, or None.
        best_score: its ``monitor`` value, or None.
        best_model_path: path of the weights file when ``dirpath`` is set, else None.
        stopped_step: step at which the stop was signalled, or None.
        stopping_reason: a :class:`MemorizationStoppingReason`.
        stopping_reason_message: a human-readable explanation of the stop, or None.
        restored_step: step of the weights loaded by ``restore_best`` at the end of fit, or None.
        wait_count: consecutive evaluations so far at which the memorization condition held.
    """

    def __init__(
        self,
        watch: MemWatch,
        patience: int = 0,
        restore_best: bool = True,
        verbose: bool = False,
        strict: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
        monitor: str | None = None,
        mode: Literal["min", "max"] | None = None,
    ) -> None:
        super().__init__()
        detector = getattr(watch, "detector", None)
        if not callable(getattr(watch, "add_listener", None)) or detector is None:
            raise TypeError(
                f"watch must be the MemWatch callback this early stopping listens to (also passed to "
                f"Trainer(callbacks=[watch, stopper])); got {type(watch).__name__}."
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise MisconfigurationException(f"`patience` must be an int >= 0 (evaluations), got {patience!r}")
        mode = mode if mode is not None else getattr(detector, "quality_mode", "min")
        if mode not in _MODES:
            raise MisconfigurationException(f"`mode` can be {', '.join(_MODES)}; got {mode!r}.")
        self.watch = watch
        self.patience = patience
        self.restore_best = bool(restore_best)
        self.verbose = bool(verbose)
        self.strict = bool(strict)
        self.dirpath = None if dirpath is None else str(dirpath)
        self.monitor: str = monitor if monitor is not None else getattr(detector, "quality_key", "fid")
        self.mode: str = mode

        self.wait_count = 0
        self.best_step: int | None = None
        self.best_score: float | None = None
        self.best_model_path: str | None = None
        self.stopped_step: int | None = None
        self.stopping_reason = MemorizationStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.restored_step: int | None = None
        self._best_weights: dict[str, Tensor] | None = None
        self._monitor_checked = False

    # -- Lightning vocabulary --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def stop_reason(self) -> MemorizationStoppingReason:
        """Alias of :attr:`stopping_reason`."""
        return self.stopping_reason

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        """The kept in-window weights (CPU copies) when ``dirpath`` is None, else None (read the file)."""
        return self._best_weights

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(cb is self.watch for cb in trainer.callbacks):
            raise MisconfigurationException(
                "MemorizationEarlyStopping listens to a MemWatch that is not among the Trainer's callbacks, "
                "so it would never evaluate: pass both, e.g. "
                "`Trainer(callbacks=[watch, MemorizationEarlyStopping(watch)])`."
            )
        self._monitor_checked = False
        watch_metrics = getattr(self.watch, "metrics", {}) or {}
        fid_off = hasattr(self.watch, "fid") and self.watch.fid is None and "fid" not in watch_metrics
        if self.monitor == "fid" and fid_off:
            # FID is known to be off before training starts: fail (or warn) now rather than at the first evaluation
            self._check_monitor({"step": trainer.global_step})
        self.watch.add_listener(self._on_evaluation)

    # -- after each evaluation ---------------------------------------------------------------------------
    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def _check_monitor(self, record: dict[str, Any]) -> None:
        self._monitor_checked = True
        if record.get(self.monitor) is not None:
            return
        available = ", ".join(f"`{k}`" for k in record if k != "step")
        message = (
            f"MemorizationEarlyStopping picks the best in-window weights by `{self.monitor}`, which the "
            f"MemWatch records do not hold (step {record.get('step')}). Turn FID on with "
            "`MemWatch(fid=FID(...))`, or log a quality metric with `MemWatch(metrics={'name': fn})` and "
            "pass `monitor='name'` here and `TimescaleDetector(quality_key='name')` to the watch, or pass "
            f"`strict=False` to only stop at tau_mem. Record keys: {available}."
        )
        if self.strict:
            raise RuntimeError(message)
        rank_zero_warn(message, category=RuntimeWarning)

    def _on_evaluation(self, trainer: Trainer, pl_module: LightningModule, record: dict[str, Any]) -> None:
        if not self._monitor_checked:
            self._check_monitor(record)
        detector = self.watch.detector
        step = int(record["step"])
        memorizing = bool(detector.is_memorizing(record))
        if memorizing:
            self.wait_count += 1
        elif detector.memorization_value(record) is not None:  # a record without f_mem leaves the count as is
            self.wait_count = 0

        tau_gen, tau_mem = detector.tau_gen, detector.tau_mem
        in_window = tau_gen is not None and tau_gen.step <= step and tau_mem is None and not memorizing
        score = _finite_float(record.get(self.monitor))
        if in_window and score is not None and self._better(score):
            self._keep(trainer, pl_module, step, score)

        should_stop = tau_mem is not None and self.wait_count >= max(1, self.patience)
        should_stop = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if should_stop and self.stopping_reason is MemorizationStoppingReason.NOT_STOPPED:
            self.stopped_step = step
            self.stopping_reason = MemorizationStoppingReason.MEMORIZATION
            onset = "on another rank" if tau_mem is None else f"tau_mem = {tau_mem.step}: {tau_mem.reason}"
            best = (
                f"best in-window {self.monitor} = {self.best_score:.4g} at step {self.best_step}"
                if self.best_step is not None
                else "no in-window evaluation was kept"
            )
            self.stopping_reason_message = (
                f"Memorization detected ({onset}); "
                f"stopping at step {step}; {best}. Signaling Trainer to stop."
            )
            self._info(self.stopping_reason_message)
        if should_stop:
            trainer.should_stop = True

    def _keep(self, trainer: Trainer, pl_module: LightningModule, step: int, score: float) -> None:
        previous = self.best_score
        self.best_step, self.best_score = step, score
        if self.dirpath is not None:
            path = Path(self.dirpath) / BEST_FILENAME
            if trainer.is_global_zero:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                payload = {"state_dict": _cpu_copy(pl_module), "step": step, "score": score}
                torch.save({**payload, "monitor": self.monitor}, tmp)
                os.replace(tmp, path)
            self.best_model_path = str(path)
        elif self.restore_best:
            self._best_weights = _cpu_copy(pl_module)
        if self.verbose:
            was = "" if previous is None else f" (was {previous:.4g})"
            self._info(
                f"MemorizationEarlyStopping: new best in-window {self.monitor} = {score:.4g}{was} "
                f"at step {step}."
            )

    # -- end of training ------------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.restore_best or self.watch.detector.tau_mem is None:
            return
        if self.best_step is None:
            tau_gen = self.watch.detector.tau_gen
            why = (
                "tau_gen was never flagged"
                if tau_gen is None
                else f"no evaluation in [tau_gen = {tau_gen.step}, tau_mem) had a finite `{self.monitor}`"
            )
            rank_zero_warn(
                f"MemorizationEarlyStopping: {why}, so there are no in-window weights to restore; the module "
                f"keeps its weights of step {trainer.global_step}."
            )
            return
        weights = self._load_kept(trainer)
        if weights is None:
            return
        pl_module.load_state_dict(weights)
        self.restored_step = self.best_step
        self._info(
            f"MemorizationEarlyStopping: restored the weights of step {self.best_step} "
            f"({self.monitor} = {self.best_score:.4g}), the best evaluation in [tau_gen, tau_mem)."
        )

    def _load_kept(self, trainer: Trainer) -> dict[str, Tensor] | None:
        if self.best_model_path is None:
            if self._best_weights is None:
                rank_zero_warn(
                    "MemorizationEarlyStopping: the best in-window weights were not kept (restore_best was "
                    "off when they were seen); the module keeps its final weights."
                )
            return self._best_weights
        trainer.strategy.barrier("memwatch_best_in_window")  # rank 0 wrote the file
        if not os.path.exists(self.best_model_path):
            rank_zero_warn(
                f"MemorizationEarlyStopping: {self.best_model_path} is missing (moved, or on another "
                "machine); the module keeps its final weights. Use a `dirpath` every rank can read."
            )
            return None
        saved = torch.load(self.best_model_path, map_location="cpu", weights_only=True)
        return saved["state_dict"]

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(message)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "wait_count": self.wait_count,
            "patience": self.patience,
            "best_step": self.best_step,
            "best_score": self.best_score,
            "best_model_path": self.best_model_path,
            "best_weights": self._best_weights,
            "stopped_step": self.stopped_step,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.wait_count = int(state_dict["wait_count"])
        self.patience = int(state_dict.get("patience", self.patience))
        self.best_step = state_dict["best_step"]
        self.best_score = state_dict["best_score"]
        self.best_model_path = state_dict.get("best_model_path")
        weights = state_dict.get("best_weights")
        self._best_weights = None if weights is None else dict(weights)
        self.stopped_step = state_dict.get("stopped_step")
        self.stopping_reason = MemorizationStoppingReason(
            state_dict.get("stopping_reason", MemorizationStoppingReason.NOT_STOPPED.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message")


def _cpu_copy(pl_module: LightningModule) -> dict[str, Tensor]:
    """A detached CPU copy of the module's state dict (never aliasing the live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

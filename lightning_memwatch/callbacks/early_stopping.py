"""MemorizationEarlyStopping: stop training at tau_mem and keep the best weights from before the onset.

The paper's window [tau_gen, tau_mem) is where a diffusion model generates good samples without copying its
training set. This callback listens to a :class:`~lightning_memwatch.MemWatch` (no sampling of its own), keeps
the best weights by sample quality (FID by default) among the evaluations before the memorization onset whose
f_mem is not significant (inside the window when tau_gen came first; also when copying begins while quality
is still improving), stops training when tau_mem is flagged, and puts the kept weights back into the module
when training ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_memwatch import log as mwlog
from lightning_memwatch._checks import check_choice, check_int, config_error, config_type_error
from lightning_memwatch._deprecation import REMOVAL_RELEASE, deprecate
from lightning_memwatch.detection import QUALITY_MODES, QualityMode, TimescaleDetector, TimescaleEvent
from lightning_memwatch.record import RecordField, finite_float
from lightning_memwatch.weights import ScoredWeights

if TYPE_CHECKING:  # pragma: no cover
    from lightning_memwatch.callbacks.memwatch import MemWatch

__all__ = ["MemorizationEarlyStopping", "MemorizationStoppingReason"]

BEST_FILENAME = "memwatch_best_in_window.pt"
STOPPING_TEXT = "memwatch/early_stopping"
"""TensorBoard text tag of the stop message."""


class WatchLike(Protocol):
    """What the stopper reads of its watch; :class:`~lightning_memwatch.MemWatch` has it all (a stand-in in a
    test or a plain loop needs the same)."""

    detector: TimescaleDetector
    history: Sequence[Mapping[str, Any]]
    record_keys: Sequence[str] | None  # None: not known before the first record
    scored_weights: ScoredWeights | None  # None: the weights in the module

    def add_listener(self, fn: Callable[..., None]) -> None: ...

    def add_event_listener(self, fn: Callable[..., None]) -> None: ...


_WATCH_ATTRIBUTES = ("detector", "history", "record_keys", "scored_weights", "add_listener", "add_event_listener")


def _move_patience(detector: TimescaleDetector, patience: int | None) -> None:
    """The deprecated ``MemorizationEarlyStopping(patience=N)``: moved to the detector (with a warning naming the
    removal release) when it asks for more than the detector's; refused once the detector has consumed records."""
    if patience is None:
        return
    patience = check_int(patience, "`patience`", minimum=0, unit="evaluations")
    if patience > max(1, detector.patience):
        if detector.num_records:
            raise config_error(
                f"MemorizationEarlyStopping(patience=...) is deprecated (removed in lightning-memwatch "
                f"{REMOVAL_RELEASE}) and the watch's detector has already consumed records: pass "
                "`TimescaleDetector(patience=N)` to the MemWatch instead."
            )
        deprecate(
            f"MemorizationEarlyStopping(patience={patience}) is deprecated and will be removed in "
            f"lightning-memwatch {REMOVAL_RELEASE}: patience lives in the detector; it is moved there "
            f"(`TimescaleDetector(patience={patience})`), so tau_mem is dated at the onset and confirmed "
            "after that many consecutive evaluations.",
            REMOVAL_RELEASE,
            stacklevel=3,  # the caller of MemorizationEarlyStopping(...)
        )
        detector.patience = patience


def _check_watch(watch: object) -> None:
    """Refuse anything but a MemWatch (or a stand-in with all of :class:`WatchLike`), naming what is missing."""
    missing = [name for name in _WATCH_ATTRIBUTES if not hasattr(watch, name)]
    detector = getattr(watch, "detector", None)
    if missing or not isinstance(detector, TimescaleDetector):
        lacks = f" (it lacks {', '.join(missing)})" if missing and len(missing) < len(_WATCH_ATTRIBUTES) else ""
        raise config_type_error(
            f"watch must be the MemWatch callback this early stopping listens to (also passed to "
            f"Trainer(callbacks=[watch, stopper])); got {type(watch).__name__}{lacks}."
        )


class MemorizationStoppingReason(Enum):
    """Why :class:`MemorizationEarlyStopping` stopped training."""

    NOT_STOPPED = 0
    MEMORIZATION = 1  # tau_mem was flagged (and patience, if any, was exhausted)


class MemorizationEarlyStopping(Callback):
    """Stop at tau_mem and end fit with the best weights from before the memorization onset.

    Add it next to the :class:`~lightning_memwatch.MemWatch` it listens to. It reacts to the watch's
    detector: it subscribes to its tau_gen / tau_mem events (``watch.add_event_listener``) and to each
    evaluation's record (``watch.add_listener``), and keeps no patience count of its own (patience lives in
    the detector). After every evaluation of the watch (on every rank, once the watch's detector has consumed
    the record and emitted its events) it:

    1. keeps a copy of the scored weights (the ones MemWatch sampled with: raw, EMA or averaged, see
       :mod:`lightning_memwatch.weights`) when tau_mem is not flagged yet, f_mem is not significant at this
       evaluation, globally or for any class of a class-conditional model (the detector's ``is_memorizing``
       is False and ``classes_memorizing`` empty) and its quality ``monitor`` beats the best so far; with no
       quality value at all, the latest such evaluation is kept. Whether tau_gen was flagged does
       not matter: when copying begins while quality is still improving, the last good weights before the
       onset are the ones to keep. Evaluations from the onset on are never kept (with the detector's
       ``patience``, the onset is the first evaluation of the run that confirmed it, and every evaluation of
       that run meets the memorization condition);
    2. signals ``trainer.should_stop`` once the detector's tau_mem event has arrived. The decision is reduced
       across ranks with ``trainer.strategy.reduce_boolean_decision`` (any rank stops all). The Trainer's own
       ``min_steps`` is honoured by Lightning: training continues until it is reached.

    When training ends (``on_train_end``) after tau_mem was flagged, ``restore_best`` loads the kept weights
    into the module, so the module returned by ``trainer.fit`` is the best pre-onset model (also under a
    Lightning ``WeightAveraging`` callback, whose own end-of-fit copy is made to agree). If tau_mem never
    fires nothing stops and the final weights stay. If no evaluation came before the onset (the model copies
    from the first evaluation on) a warning says so and the weights stay. When tau_gen had not been flagged
    before the onset, the stop message and a TensorBoard text entry (``memwatch/early_stopping``) say that
    quality was still improving when copying began (the kept evaluation is the last one before the onset), or
    that it had stopped improving after the kept step without the plateau rule confirming it.

    The kept weights belong to the watch's history: after a resume where the watch could not restore its
    state (other settings, or none in the checkpoint), the stopper drops its kept weights with a warning
    instead of restoring weights of a history the watch no longer has. Resuming from a checkpoint of a run
    that already stopped stops again at once.

    Example:
        >>> from lightning_memwatch import MemWatch, MemorizationEarlyStopping
        >>> watch = MemWatch(num_samples=1000)
        >>> stopper = MemorizationEarlyStopping(watch, monitor="val_loss", strict=False)
        >>> stopper.stopping_reason
        <MemorizationStoppingReason.NOT_STOPPED: 0>

    Args:
        watch: the :class:`~lightning_memwatch.MemWatch` whose flags drive the callback; it must also be in
            ``Trainer(callbacks=...)``.
        patience: deprecated, removed in lightning-memwatch 0.3.0; set ``TimescaleDetector(patience=N)`` on the
            watch instead (patience lives in the detector, which dates tau_mem at the onset and confirms it after
            N consecutive evaluations). A value > 1 given here is moved to the watch's detector with a
            ``DeprecationWarning``.
        restore_best: load the best pre-onset weights into the module when training ends after tau_mem.
        verbose: log a line on rank 0 at each new best, at the stop and at the restore.
        strict: raise when the watch's records will not hold ``monitor`` (e.g. FID off and no quality metric
            given), at setup when it can be known there; with ``strict=False`` warn once, keep the latest
            pre-onset weights and stop at tau_mem.
        dirpath: directory for the kept weights, written atomically by global rank 0 as
            ``memwatch_best_in_window.pt`` (``torch.save`` of ``{"state_dict", "step", "score", "monitor"}``)
            and read back by every rank (so it must be visible to all ranks, as for ``ModelCheckpoint``). None
            keeps a CPU copy in memory on each rank instead, which is also saved in this callback's
            checkpoint state so that a resumed run can still restore it (about the model's size).
        monitor: record key of the quality used to pick the best weights; default the watch detector's
            ``quality_key`` (``"fid"``). Any metric the watch merges into its records works.
        mode: ``"min"`` (lower is better) or ``"max"``; default the detector's ``quality_mode`` (``"min"``).
        per_class: class-conditional models: also stop at the first class whose tau_mem is confirmed (the
            detector's per-class events, same rule and patience). False (default): stop at the global tau_mem
            alone. Either way, weights are kept only from evaluations where no class (with at least the
            detector's ``min_class_samples`` samples) meets the memorization condition.

    Attributes:
        best_step: step (optimizer steps) of the kept evaluation, or None.
        best_score: its ``monitor`` value, or None (also when kept without a quality value).
        best_f_mem: its f_mem, or None.
        best_model_path: path of the weights file when ``dirpath`` is set, else None.
        stopped_step: step at which the stop was signalled, or None.
        stopping_reason: a :class:`MemorizationStoppingReason`.
        stopping_reason_message: a human-readable explanation of the stop, or None.
        restored_step: step of the weights loaded by ``restore_best`` at the end of fit, or None.
    """

    def __init__(
        self,
        watch: MemWatch | WatchLike,
        patience: int | None = None,
        restore_best: bool = True,
        verbose: bool = False,
        strict: bool = True,
        dirpath: str | os.PathLike[str] | None = None,
        monitor: str | None = None,
        mode: QualityMode | None = None,
        per_class: bool = False,
    ) -> None:
        super().__init__()
        _check_watch(watch)
        detector = watch.detector
        _move_patience(detector, patience)
        mode = mode if mode is not None else detector.quality_mode
        mode = check_choice(mode, "`mode`", QUALITY_MODES)
        self.watch: WatchLike = watch
        self.restore_best = bool(restore_best)
        self.verbose = bool(verbose)
        self.strict = bool(strict)
        self.dirpath = None if dirpath is None else str(dirpath)
        self.monitor: str = monitor if monitor is not None else detector.quality_key
        self.mode: str = mode
        if not isinstance(per_class, bool):
            raise config_type_error(f"per_class must be True or False; got {per_class!r}.")
        self.per_class = per_class

        self.best_step: int | None = None
        self.best_score: float | None = None
        self.best_f_mem: float | None = None
        self.best_model_path: str | None = None
        self.stopped_step: int | None = None
        self.stopping_reason = MemorizationStoppingReason.NOT_STOPPED
        self.stopping_reason_message: str | None = None
        self.restored_step: int | None = None
        self._best_weights: dict[str, Tensor] | None = None
        # the detector's events as they arrived (saved with the state, so a resumed run knows tau_gen)
        self._tau_gen: TimescaleEvent | None = None
        self._tau_mem: TimescaleEvent | None = None
        self._events_from_watch = False  # a state saved before the events were kept: read them once
        self._monitor_checked = False
        self._lineage_checked = False
        self._saved_watch: dict[str, Any] | None = None  # the watch's position when the loaded state was saved

    # -- Lightning vocabulary --------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    @property
    def stop_reason(self) -> MemorizationStoppingReason:
        """Alias of :attr:`stopping_reason`."""
        return self.stopping_reason

    @property
    def patience(self) -> int:
        """The watch detector's ``patience`` (evaluations); kept for compatibility, set it on the detector."""
        return int(self.watch.detector.patience)

    @property
    def wait_count(self) -> int:
        """Consecutive evaluations so far meeting the memorization condition (the detector's ``run_length``)."""
        return self.watch.detector.run_length

    @property
    def best_weights(self) -> dict[str, Tensor] | None:
        """The kept weights (CPU copies) when ``dirpath`` is None, else None (read the file)."""
        return self._best_weights

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not any(cb is self.watch for cb in trainer.callbacks):
            raise config_error(
                "MemorizationEarlyStopping listens to a MemWatch that is not among the Trainer's callbacks, "
                "so it would never evaluate: pass both, e.g. "
                "`Trainer(callbacks=[watch, MemorizationEarlyStopping(watch)])`."
            )
        self._monitor_checked = False
        self._lineage_checked = False
        keys = self.watch.record_keys
        # known before training starts (the watch's records will not hold the monitor): fail (or warn) now
        if keys is not None and self.monitor not in keys:
            self._check_monitor({"step": trainer.global_step}, at_setup=True)
        self.watch.add_event_listener(self._on_event)
        self.watch.add_listener(self._on_evaluation)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_lineage()
        self._adopt_watch_events()
        if self.stopping_reason is not MemorizationStoppingReason.NOT_STOPPED:
            # resumed from a checkpoint of a run that already stopped: stop again before another step
            self._info(
                f"MemorizationEarlyStopping: the checkpoint's run already stopped at step {self.stopped_step} "
                "(tau_mem); stopping at once."
            )
            trainer.should_stop = True

    # -- after each evaluation ---------------------------------------------------------------------------
    def _better(self, score: float) -> bool:
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def _check_monitor(self, record: Mapping[str, Any], at_setup: bool = False) -> None:
        self._monitor_checked = True
        if record.get(self.monitor) is not None:
            return
        keys = self.watch.record_keys
        listed = keys if at_setup and keys is not None else [k for k in record if k != "step"]
        available = ", ".join(f"`{k}`" for k in listed)
        when = "will not hold" if at_setup else f"do not hold (step {record.get('step')})"
        message = (
            f"MemorizationEarlyStopping picks the best pre-onset weights by `{self.monitor}`, which the "
            f"MemWatch records {when}. Turn FID on with "
            "`MemWatch(fid=FID(...))`, or log a quality metric with `MemWatch(metrics={'name': fn})` and "
            "pass `monitor='name'` here and `TimescaleDetector(quality_key='name')` to the watch, or pass "
            f"`strict=False` to keep the latest pre-onset weights and stop at tau_mem. Record keys: {available}."
        )
        if self.strict:
            if at_setup:
                raise config_error(message)
            raise RuntimeError(message)
        rank_zero_warn(message, category=RuntimeWarning)

    def _on_event(self, trainer: Trainer, pl_module: LightningModule, event: TimescaleEvent) -> None:
        """A tau_gen / tau_mem event of the watch's detector (every rank, before the evaluation's record)."""
        self._check_lineage(evaluating=True)
        self._adopt_watch_events()
        if event.label is not None and not self.per_class:
            return  # a per-class onset: only MemorizationEarlyStopping(per_class=True) stops at it
        if event.name == "tau_gen" and self._tau_gen is None:
            self._tau_gen = event
        elif event.name == "tau_mem" and self._tau_mem is None:
            self._tau_mem = event

    def _adopt_watch_events(self) -> None:
        """Once, for a state saved before the stopper kept the events: take the flags the watch's detector
        restored from the same checkpoint (events fired before it will not come again)."""
        if self._events_from_watch:
            self._events_from_watch = False
            detector = self.watch.detector
            self._tau_gen = self._tau_gen or detector.tau_gen
            self._tau_mem = self._tau_mem or detector.tau_mem

    def _on_evaluation(self, trainer: Trainer, pl_module: LightningModule, record: Mapping[str, Any]) -> None:
        self._check_lineage(evaluating=True)  # the watch has appended this record to its history already
        self._adopt_watch_events()
        if not self._monitor_checked:
            self._check_monitor(record)
        detector = self.watch.detector
        step = int(record[RecordField.STEP])
        tau_gen, tau_mem = self._tau_gen, self._tau_mem
        f_mem = detector.memorization_value(record)
        # the detector's per-record rule (not its state): is f_mem significant at this evaluation?
        # class-conditional records: weights under which any class copies are never kept (per_class or not)
        memorizing = detector.is_memorizing(record) or bool(detector.classes_memorizing(record))
        if tau_mem is None and f_mem is not None and not memorizing:
            score = finite_float(record.get(self.monitor))
            if score is not None and self._better(score):
                self._keep(trainer, pl_module, step, score, record)
            elif score is None and self.best_score is None:  # no quality signal: the latest such evaluation
                self._keep(trainer, pl_module, step, None, record)

        should_stop = trainer.strategy.reduce_boolean_decision(tau_mem is not None, all=False)
        if should_stop and self.stopping_reason is MemorizationStoppingReason.NOT_STOPPED:
            self.stopped_step = step
            self.stopping_reason = MemorizationStoppingReason.MEMORIZATION
            self.stopping_reason_message = self._stop_message(step, tau_gen, tau_mem)
            if self._still_improving(tau_gen, tau_mem) and self.best_score is not None:
                rank_zero_warn(self.stopping_reason_message)
            else:
                self._info(self.stopping_reason_message)
            if trainer.is_global_zero and getattr(trainer, "loggers", None):
                mwlog.log_text(trainer, STOPPING_TEXT, self.stopping_reason_message, step)
        if should_stop:
            trainer.should_stop = True

    @staticmethod
    def _still_improving(tau_gen: Any, tau_mem: Any) -> bool:
        """tau_mem flagged while tau_gen was not flagged before the onset."""
        return tau_mem is not None and (tau_gen is None or tau_gen.step >= tau_mem.step)

    def _stop_message(self, step: int, tau_gen: Any, tau_mem: Any) -> str:
        onset = "on another rank" if tau_mem is None else f"tau_mem = {tau_mem.step}: {tau_mem.reason}"
        head = f"Memorization detected ({onset}); stopping at step {step}"
        if self.best_step is None:
            return f"{head}; no evaluation before the onset had a non-significant f_mem, so no weights were kept."
        fmem = "n/a" if self.best_f_mem is None else f"{self.best_f_mem:.4g}"
        verb = "restored" if self.restore_best else "best pre-onset"
        if self.best_score is None:
            return (
                f"{head}; the records hold no `{self.monitor}`, so the latest evaluation before the onset is kept: "
                f"{verb} step {self.best_step}, f_mem {fmem}."
            )
        kept = f"{verb} step {self.best_step}, {self.monitor} {self.best_score:.4g}, f_mem {fmem}"
        if self._still_improving(tau_gen, tau_mem) and self._best_is_latest_before(tau_mem):
            return (
                f"{head}: quality was still improving when copying began (tau_gen not flagged before the onset); "
                f"{kept}."
            )
        if self._still_improving(tau_gen, tau_mem):
            return (
                f"{head}: quality stopped improving after step {self.best_step}, but tau_gen's rule had not "
                f"confirmed a plateau when copying began; {kept}."
            )
        return f"{head}; tau_gen = {tau_gen.step if tau_gen is not None else 'n/a'}; {kept}."

    def _best_is_latest_before(self, tau_mem: Any) -> bool:
        """Whether the kept evaluation is the watch's last one before the onset (quality still improving)."""
        onset = None if tau_mem is None else int(tau_mem.step)
        steps = [int(r[RecordField.STEP]) for r in self.watch.history]
        before = [s for s in steps if onset is None or s < onset]
        return not before or max(before) == self.best_step

    def _keep(
        self, trainer: Trainer, pl_module: LightningModule, step: int, score: float | None, record: Mapping[str, Any]
    ) -> None:
        previous = self.best_score
        self.best_step, self.best_score = step, score
        self.best_f_mem = finite_float(record.get(RecordField.F_MEM))
        if self.dirpath is not None:
            path = Path(self.dirpath) / BEST_FILENAME
            if trainer.is_global_zero:
                payload = {"state_dict": _cpu_copy(pl_module), "step": step, "score": score}
                _save_atomically(path, {**payload, "monitor": self.monitor})
            self.best_model_path = str(path)
        elif self.restore_best:
            self._best_weights = _cpu_copy(pl_module)
        if self.verbose:
            now = "no quality value" if score is None else f"{self.monitor} = {score:.4g}"
            was = "" if previous is None else f" (was {previous:.4g})"
            self._info(f"MemorizationEarlyStopping: kept the weights of step {step} ({now}{was}).")

    # -- the watch's history -----------------------------------------------------------------------------
    def _watch_position(self, evaluating: bool = False) -> dict[str, Any] | None:
        history = self.watch.history
        if evaluating:
            history = history[:-1]
        return {
            "num_records": len(history),
            "last_step": int(history[-1][RecordField.STEP]) if history else None,
        }

    def _check_lineage(self, evaluating: bool = False) -> None:
        """Drop kept state that belongs to a watch history the watch no longer has (state not restored)."""
        if self._lineage_checked:
            return
        self._lineage_checked = True
        saved, now = self._saved_watch, self._watch_position(evaluating)
        self._saved_watch = None
        if saved is None or now is None or saved == now:
            return
        rank_zero_warn(
            f"MemorizationEarlyStopping: its checkpoint state belongs to a MemWatch history of "
            f"{saved['num_records']} evaluation(s) up to step {saved['last_step']}, but the watch now holds "
            f"{now['num_records']} (its state was not restored from the checkpoint; see MemWatch's warning). "
            f"The kept weights (step {self.best_step}) and the stop state are dropped; both start afresh."
        )
        self._reset()

    def _reset(self) -> None:
        self.best_step = self.best_score = self.best_f_mem = None
        self.best_model_path = None
        self._best_weights = None
        self.stopped_step = None
        self.stopping_reason = MemorizationStoppingReason.NOT_STOPPED
        self.stopping_reason_message = None
        self._tau_gen = self._tau_mem = None
        self._events_from_watch = False

    # -- end of training ------------------------------------------------------------------------------
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tau_mem = self._tau_mem
        if not self.restore_best or tau_mem is None:
            return
        if self.best_step is None:
            rank_zero_warn(
                f"MemorizationEarlyStopping: no evaluation before the memorization onset (tau_mem = "
                f"{tau_mem.step}) had a non-significant f_mem, so there are no weights to restore; the module "
                f"keeps its weights of step {trainer.global_step}."
            )
            return
        weights = self._load_kept(trainer)
        if weights is None:
            return
        scored = self.watch.scored_weights
        if scored is not None:
            scored.restore(trainer, pl_module, weights)
        else:
            pl_module.load_state_dict(weights)
        self.restored_step = self.best_step
        quality = "" if self.best_score is None else f" ({self.monitor} = {self.best_score:.4g})"
        self._info(
            f"MemorizationEarlyStopping: restored the weights of step {self.best_step}{quality}, the best "
            f"evaluation before the memorization onset (step {tau_mem.step})."
        )

    def _load_kept(self, trainer: Trainer) -> dict[str, Tensor] | None:
        if self.best_model_path is None:
            if self._best_weights is None:
                rank_zero_warn(
                    "MemorizationEarlyStopping: the best pre-onset weights were not kept (restore_best was "
                    "off when they were seen); the module keeps its final weights."
                )
            return self._best_weights
        trainer.strategy.barrier("memwatch_best_in_window")  # rank 0 wrote the file
        return _read_kept(self.best_model_path, self.best_step)

    def _info(self, message: str) -> None:
        if self.verbose:
            rank_zero_info(message)

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "best_step": self.best_step,
            "best_score": self.best_score,
            "best_f_mem": self.best_f_mem,
            "best_model_path": self.best_model_path,
            "best_weights": self._best_weights,
            "stopped_step": self.stopped_step,
            "stopping_reason": self.stopping_reason.value,
            "stopping_reason_message": self.stopping_reason_message,
            "watch": self._watch_position(),
            "events": {
                "tau_gen": None if self._tau_gen is None else self._tau_gen.to_dict(),
                "tau_mem": None if self._tau_mem is None else self._tau_mem.to_dict(),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_step = state_dict["best_step"]
        self.best_score = state_dict["best_score"]
        self.best_f_mem = state_dict.get("best_f_mem")
        self.best_model_path = state_dict.get("best_model_path")
        weights = state_dict.get("best_weights")
        self._best_weights = None if weights is None else dict(weights)
        self.stopped_step = state_dict.get("stopped_step")
        self.stopping_reason = MemorizationStoppingReason(
            state_dict.get("stopping_reason", MemorizationStoppingReason.NOT_STOPPED.value)
        )
        self.stopping_reason_message = state_dict.get("stopping_reason_message")
        self._saved_watch = state_dict.get("watch")
        self._lineage_checked = False
        events = state_dict.get("events")
        if events is None:  # saved before the stopper kept the events: the watch's detector has them
            self._tau_gen = self._tau_mem = None
            self._events_from_watch = True
        else:
            self._tau_gen = None if events.get("tau_gen") is None else TimescaleEvent.from_dict(events["tau_gen"])
            self._tau_mem = None if events.get("tau_mem") is None else TimescaleEvent.from_dict(events["tau_mem"])
            self._events_from_watch = False


def _save_atomically(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to ``path`` through a file aside, then renamed: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        torch.save(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _read_kept(path: str, step: int | None) -> dict[str, Tensor] | None:
    """The kept weights of ``step`` from the file at ``path``; None with a warning when it is missing, unreadable
    or holds another step (the module then keeps its final weights)."""
    if not os.path.exists(path):
        rank_zero_warn(
            f"MemorizationEarlyStopping: {path} is missing (moved, or on another machine); the module keeps its "
            "final weights. Use a `dirpath` every rank can read."
        )
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        weights = saved["state_dict"]
        if int(saved["step"]) != step:
            raise ValueError(f"it holds step {saved['step']}, not {step}")
    except Exception as err:  # truncated, corrupt or foreign file: keep training's result, say why
        rank_zero_warn(
            f"MemorizationEarlyStopping: could not read {path} ({type(err).__name__}: {err}); the module keeps "
            "its final weights."
        )
        return None
    return weights


def _cpu_copy(pl_module: LightningModule) -> dict[str, Tensor]:
    """A detached CPU copy of the module's state dict (never aliasing the live parameters)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

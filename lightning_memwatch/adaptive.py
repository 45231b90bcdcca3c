"""An adaptive evaluation schedule: sparse while nothing happens, dense when memorization approaches.

Sampling is the cost of watching, and most evaluations of a fixed grid fall in the long window before
tau_mem where f_mem = 0. :class:`AdaptiveSchedule` spaces MemWatch's evaluations log-wise (each step a factor
``growth`` after the last) while f_mem is zero and the loss-gap probe is quiet, and moves closer as soon as
either stirs, down to ``min_every`` steps, within the user's bounds. Every step it picks lies on the grid of
multiples of ``multiple`` (default ``min_every``), so it evaluates a subset of the dense schedule
``EvalSchedule.every(min_every, include_zero=True)``.

Decisions depend only on what was observed (MemWatch records and probe readings, identical on every DDP rank),
so they repeat exactly; they are kept in :attr:`AdaptiveSchedule.decisions` with the reason of each, saved in
MemWatch's checkpoint state and restored on resume. No Lightning import here: a plain loop can call
:meth:`observe` and :meth:`observe_probe` itself.

Rules, after an evaluation at step ``s`` with f_mem ``f`` (every spacing is then kept within
``[min_every, max_every]`` and rounded up to the grid):

1. ``f >= f_mem_target`` ("above"): the next evaluation ``min_every`` steps later (a stopper's patience
   counts evaluations past the threshold);
2. ``0 < f < f_mem_target`` ("f_mem", f_mem left zero): extrapolate f_mem linearly from the last evaluation
   with f_mem = 0 to the step where it reaches the target, and go a fraction ``safety`` of the way there, at
   most ``s * (watch_growth - 1)``;
3. ``f = 0`` and the record holds an onset forecast with interval ``[low, high]``
   (:mod:`lightning_memwatch.onset`; "forecast"): before ``low``, rule 4 or 5 but no further than ``low``;
   inside the interval (or past ``low`` when it is open), log-spaced, denser: ``s * (watch_growth - 1)``;
4. ``f = 0`` and the probe's signal is up ("probe"): log-spaced, denser: ``s * (watch_growth - 1)``;
5. otherwise ("flat"): log-spaced, sparse: ``s * (growth - 1)``.

The probe's signal is ``"heldout_rise"`` (default): how far the held-out denoising loss has risen above its
lowest value so far, relative to it (the classic overfitting onset: the training loss keeps falling while the
held-out loss turns up), or ``"gap"``: the relative loss gap itself. A reading that raises the signal above its
threshold between two evaluations brings the next one forward (never before a step already passed).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

from lightning_memwatch._arguments import check_choice, config_error
from lightning_memwatch.metrics.loss_gap import LossGapReading
from lightning_memwatch.schedule import EvalSchedule

__all__ = ["AdaptiveSchedule", "Decision"]

Signal = Literal["heldout_rise", "gap"]
_SIGNALS: tuple[str, ...] = get_args(Signal)


@dataclasses.dataclass(frozen=True)
class Decision:
    """Why the schedule picked its next evaluation step.

    Attributes:
        at_step: optimizer step at which the decision was made (an evaluation's, or a probe reading's).
        next_step: the evaluation step chosen (optimizer steps).
        rule: ``"start"``, ``"flat"``, ``"forecast"``, ``"probe"``, ``"f_mem"``, ``"above"``, ``"resume"`` or
            ``"external"``
            (an evaluation this schedule did not plan).
        reason: one line for people.
        f_mem: f_mem of the evaluation the decision follows (None for probe-driven decisions).
        signal: the probe's signal then (None without a probe reading).
    """

    at_step: int
    next_step: int
    rule: str
    reason: str
    f_mem: float | None = None
    signal: float | None = None


class AdaptiveSchedule(EvalSchedule):
    """Sparse log-spaced MemWatch evaluations while the probe and f_mem are flat, dense when either rises.

    Pass it as ``MemWatch(schedule=AdaptiveSchedule(...))``; MemWatch feeds it each evaluation's record.

    Example:
        >>> s = AdaptiveSchedule(min_every=100, max_every=1000)
        >>> 0 in s, 100 in s
        (True, False)
        >>> s.observe({"step": 0, "f_mem": 0.0})
        >>> s.next_step
        100
        >>> s.observe({"step": 100, "f_mem": 0.0}); s.next_step   # log-spaced: four times the step
        400
        >>> s.observe({"step": 400, "f_mem": 0.0}); s.next_step   # at most max_every later
        1400
        >>> s.reason_for(400)
        'flat: flat (f_mem 0, probe heldout_rise n/a): log-spaced x4 (decided at step 100)'

    Args:
        min_every: smallest spacing between evaluations (optimizer steps); the dense schedule's period.
        max_every: largest spacing (optimizer steps).
        growth: factor between consecutive steps while flat (4: steps 0, m, 4m, 16m, ... for min_every m).
        watch_growth: factor between consecutive steps while the probe is up or f_mem > 0 (1 < it <= growth).
        safety: fraction of the way to the extrapolated crossing of ``f_mem_target`` (0 < safety <= 1).
        probe: a :class:`~lightning_memwatch.callbacks.probe.LossGapProbe` whose readings the schedule watches, or None.
        signal: the probe signal, ``"heldout_rise"`` or ``"gap"`` (see the module's docs).
        signal_threshold: signal level that makes the schedule move closer (a relative change: 0.02 = 2%).
        f_mem_target: the f_mem level that matters, normally the detector's tau_mem threshold (a fraction).
        f_mem_key: record field of f_mem.
        start: first evaluation (optimizer steps).
        multiple: every chosen step is a multiple of this (default ``min_every``).
        stop: no evaluation after this step (None: no end).
    """

    def __init__(
        self,
        min_every: int,
        max_every: int,
        *,
        growth: float = 4.0,
        watch_growth: float = 1.25,
        safety: float = 0.25,
        probe: Any = None,
        signal: Signal = "heldout_rise",
        signal_threshold: float = 0.02,
        f_mem_target: float = 0.03,
        f_mem_key: str = "f_mem",
        start: int = 0,
        multiple: int | None = None,
        stop: int | None = None,
    ) -> None:
        if isinstance(min_every, bool) or int(min_every) < 1:
            raise config_error(f"min_every must be a positive number of optimizer steps; got {min_every!r}.")
        if int(max_every) < int(min_every):
            raise config_error(f"Need max_every >= min_every (optimizer steps); got {max_every} < {min_every}.")
        if not growth >= watch_growth > 1.0:
            raise config_error(
                "Need growth >= watch_growth > 1 (the factors between consecutive steps while flat and while "
                f"watching); got growth={growth}, watch_growth={watch_growth}."
            )
        check_choice(signal, "signal", _SIGNALS)
        if not signal_threshold > 0 or not f_mem_target > 0 or not 0 < safety <= 1:
            raise config_error(
                "Need signal_threshold > 0, f_mem_target > 0 and 0 < safety <= 1; got "
                f"{signal_threshold}, {f_mem_target}, {safety}."
            )
        multiple = int(min_every) if multiple is None else int(multiple)
        if multiple < 1 or int(start) < 0 or int(start) % multiple:
            raise config_error(
                f"Need multiple >= 1 and start >= 0 a multiple of it; got multiple={multiple}, start={start}."
            )
        if stop is not None and int(stop) < int(start):
            raise config_error(f"Need stop >= start; got stop={stop}, start={start}.")
        super().__init__(steps=[int(start)])
        self.min_every, self.max_every = int(min_every), int(max_every)
        self.growth, self.watch_growth, self.safety = float(growth), float(watch_growth), float(safety)
        self.signal, self.signal_threshold = signal, float(signal_threshold)
        self.f_mem_target, self.f_mem_key = float(f_mem_target), f_mem_key
        self.start, self.multiple = int(start), multiple
        self.stop = None if stop is None else int(stop)
        self.decisions: list[Decision] = []
        self.evaluations: list[Decision] = []
        self._next: int | None = int(start)
        self._last_step: int | None = None  # last evaluation
        self._last_f: float = 0.0
        self._last_zero_step: int | None = None  # last evaluation with f_mem = 0
        self._forecast: tuple[float, float, float | None] | None = None  # (low, step, high) of the last record
        self._lowest_heldout: float | None = None
        self._signal_value: float | None = None
        self._signal_step: int | None = None
        self.decisions.append(Decision(int(start), int(start), "start", f"first evaluation at step {start}"))
        if probe is not None:
            probe.add_listener(self.observe_probe)

    # -- EvalSchedule queries (MemWatch calls these) --------------------------------------------------
    @property
    def next_step(self) -> int | None:
        """The planned next evaluation (optimizer steps), or None after ``stop``."""
        return self._next

    @property
    def steps(self) -> tuple[int, ...]:
        """The steps evaluated so far and the planned next one."""
        done = [d.next_step for d in self.evaluations]
        return tuple(sorted({*done, *([self._next] if self._next is not None else [])}))

    def __contains__(self, step: object) -> bool:
        return isinstance(step, int) and not isinstance(step, bool) and step == self._next

    def next_after(self, step: int) -> int | None:
        """The planned evaluation if it lies after ``step``, else None (the rest depends on what is observed)."""
        return self._next if self._next is not None and self._next > step else None

    def between(self, after: int, before: int) -> list[int]:
        """The planned step when it lies strictly between ``after`` and ``before`` (a resume skipped it).

        Side effect: a planned step already passed (``< before``) is moved to the first grid step at or
        after ``before``, recorded as a ``"resume"`` decision, so the schedule never stalls.
        """
        if self._next is None or not after < self._next < before:
            return []
        missed = self._next
        target = self._ceil(before)
        self._set_next(target, before, "resume", f"planned step {missed} was skipped by a resume at {before}")
        return [missed]

    # -- observations ---------------------------------------------------------------------------------
    def observe(self, record: Mapping[str, Any]) -> None:
        """Take one MemWatch evaluation record (``step`` and ``f_mem_key``) and plan the next evaluation."""
        step = int(record["step"])
        pending = self.decisions[-1] if self.decisions else None
        if pending is not None and pending.next_step == step and self._next == step:
            self.evaluations.append(pending)
        else:
            self.evaluations.append(Decision(step, step, "external", "evaluated outside this schedule's plan"))
        value = record.get(self.f_mem_key)
        f = float(value) if value is not None and math.isfinite(float(value)) else 0.0
        self._last_step, self._last_f = step, f
        if f == 0.0:
            self._last_zero_step = step
        forecast, low = record.get("onset_forecast"), record.get("onset_forecast_low")
        self._forecast = None
        if forecast is not None and low is not None:
            self._forecast = (float(low), float(forecast), record.get("onset_forecast_high"))
        self._decide(step)

    def observe_probe(self, reading: LossGapReading) -> None:
        """Take one loss-gap reading; a signal above threshold may bring the next evaluation forward."""
        if self._lowest_heldout is None or reading.loss_heldout < self._lowest_heldout:
            self._lowest_heldout = reading.loss_heldout
        if self.signal == "gap":
            value = reading.gap
        else:
            low = self._lowest_heldout
            value = (reading.loss_heldout - low) / low if low > 0 else 0.0
        self._signal_value, self._signal_step = float(value), int(reading.step)
        if self._last_step is None or self._next is None:
            return
        if reading.step == self._last_step:  # the reading of the evaluation's own step: decide again with it
            self._decide(self._last_step)
            return
        if reading.step < self._last_step:
            return
        spacing, rule, why = self._spacing(self._last_step)
        candidate = max(self._ceil(self._last_step + spacing), self._ceil(reading.step + 1))
        if rule == "probe" and candidate < self._next:
            self._set_next(candidate, reading.step, rule, why + f" (probe reading at step {reading.step})")

    # -- rules ----------------------------------------------------------------------------------------
    def _ceil(self, step: int) -> int:
        return -(-int(step) // self.multiple) * self.multiple

    def _bounded(self, spacing: float) -> int:
        spacing = min(max(spacing, self.min_every), self.max_every)
        return max(self.multiple, self._ceil(math.ceil(spacing - 1e-9)))

    def _spacing(self, step: int) -> tuple[int, str, str]:
        f, target = self._last_f, self.f_mem_target
        watch = self._bounded(step * (self.watch_growth - 1))
        if f >= target:
            return self._bounded(self.min_every), "above", f"f_mem {f:.4g} >= target {target:g}: every min_every steps"
        if f > 0:
            # linear extrapolation from the last evaluation with f_mem = 0 to the step where f_mem reaches the
            # target; go a fraction `safety` of the way (f_mem tends to accelerate)
            zero = self._last_zero_step if self._last_zero_step is not None else self.start
            if step > zero:
                crossing = zero + (step - zero) * target / f
                spacing = min(self._bounded(self.safety * (crossing - step)), watch)
                why = (
                    f"f_mem {f:.4g} left zero; reaches {target:g} near step {crossing:.0f} at this rate: "
                    f"{self.safety:g} of the way, at most x{self.watch_growth:g}"
                )
                return spacing, "f_mem", why
            return self._bounded(self.min_every), "f_mem", f"f_mem {f:.4g} > 0 from the first evaluation"
        planned = self._probe_or_flat(step, watch)
        if self._forecast is not None:
            low, forecast, high = self._forecast
            shown = f"onset forecast ~{forecast:.0f} [{low:.0f}, {'open' if high is None else f'{high:.0f}'}]"
            if step < low:
                if step + planned[0] > low:  # the plan would jump past the interval's early end
                    return self._bounded(low - step), "forecast", f"{shown}: to its early end"
            elif high is None or step <= high:
                return watch, "forecast", f"{shown}: inside it, log-spaced x{self.watch_growth:g}"
        return planned

    def _probe_or_flat(self, step: int, watch: int) -> tuple[int, str, str]:
        """Rules 4 and 5: the watching rate while the probe's signal is up, else the sparse one."""
        sig = self._signal_value
        if sig is not None and sig >= self.signal_threshold:
            return (
                watch,
                "probe",
                f"probe {self.signal} {sig:.4g} >= {self.signal_threshold:g} at step {self._signal_step}: "
                f"log-spaced x{self.watch_growth:g}",
            )
        flat = self._bounded(step * (self.growth - 1))
        shown = f"{sig:.4g}" if sig is not None else "n/a"
        return flat, "flat", f"flat (f_mem 0, probe {self.signal} {shown}): log-spaced x{self.growth:g}"

    def _decide(self, step: int) -> None:
        spacing, rule, why = self._spacing(step)
        self._set_next(step + spacing, step, rule, why)

    def _set_next(self, target: int, at_step: int, rule: str, reason: str) -> None:
        target = self._ceil(target)
        if self.stop is not None and target > self.stop:
            self._next = None
            reason += f"; past stop={self.stop}: no further evaluation"
        else:
            self._next = target
        f = self._last_f if rule != "probe" else None
        self.decisions.append(
            Decision(int(at_step), int(target), rule, reason, f_mem=f, signal=self._signal_value)
        )

    # -- history --------------------------------------------------------------------------------------
    def evaluated(self) -> list[Decision]:
        """The decision behind each evaluation so far, in step order."""
        return list(self.evaluations)

    def reason_for(self, step: int) -> str | None:
        """Why the evaluation at ``step`` happened (None when it was not an evaluation)."""
        for d in self.evaluations:
            if d.next_step == step:
                return f"{d.rule}: {d.reason} (decided at step {d.at_step})"
        return None

    # -- state ----------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings (JSON-able)."""
        return {
            "min_every": self.min_every,
            "max_every": self.max_every,
            "growth": self.growth,
            "watch_growth": self.watch_growth,
            "safety": self.safety,
            "signal": self.signal,
            "signal_threshold": self.signal_threshold,
            "f_mem_target": self.f_mem_target,
            "f_mem_key": self.f_mem_key,
            "start": self.start,
            "multiple": self.multiple,
            "stop": self.stop,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything observed and decided, to resume exactly (MemWatch saves it in its own state)."""
        return {
            "config": self.config(),
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
            "evaluations": [dataclasses.asdict(d) for d in self.evaluations],
            "next": self._next,
            "last_step": self._last_step,
            "last_f": self._last_f,
            "last_zero_step": self._last_zero_step,
            "lowest_heldout": self._lowest_heldout,
            "signal_value": self._signal_value,
            "signal_step": self._signal_step,
            "forecast": None if self._forecast is None else list(self._forecast),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; the settings must match (a changed schedule is not the same run)."""
        if state["config"] != self.config():
            raise config_error(
                "AdaptiveSchedule settings differ from the checkpoint's: resume with the same settings "
                f"({state['config']}), or start a new run; got {self.config()}."
            )
        self.decisions = [Decision(**d) for d in state["decisions"]]
        self.evaluations = [Decision(**d) for d in state["evaluations"]]
        self._next, self._last_step, self._last_f = state["next"], state["last_step"], state["last_f"]
        self._last_zero_step = state["last_zero_step"]
        self._lowest_heldout = state["lowest_heldout"]
        self._signal_value, self._signal_step = state["signal_value"], state["signal_step"]
        forecast = state.get("forecast")  # absent in the states of earlier versions
        self._forecast = None if forecast is None else (forecast[0], forecast[1], forecast[2])

    def __repr__(self) -> str:
        return f"AdaptiveSchedule({', '.join(f'{k}={v!r}' for k, v in self.config().items())}; next={self._next})"

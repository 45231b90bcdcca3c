"""When to evaluate: MemWatch's default (dense at the start), every N optimizer steps, log-spaced steps (the
paper's grid), or explicit steps.

Training time is counted in optimizer steps (``trainer.global_step``), as in the paper.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from torch import Tensor

from lightning_memwatch._checks import check_int, config_error, config_type_error

__all__ = ["EvalSchedule", "paper_grid"]

# MemWatch's default schedule ("auto"): (period, last step of that period), then AUTO_PERIOD for ever after.
AUTO_START: tuple[tuple[int, int], ...] = ((100, 1000), (250, 2000))
AUTO_PERIOD = 500


def _log_spaced(start: float, stop: float, num: int, multiple: int) -> list[int]:
    """``num`` log-spaced values from ``start`` to ``stop`` (inclusive), rounded down to ``multiple``."""
    if num == 1:
        return [int(stop // multiple * multiple)]
    lo, hi = math.log10(start), math.log10(stop)
    values = (10 ** (lo + (hi - lo) * i / (num - 1)) for i in range(num))
    # The small epsilon keeps exact powers (e.g. 10**4 computed as 9999.999...) from rounding down a step.
    return [int((v * (1 + 1e-12)) // multiple * multiple) for v in values]


def paper_grid() -> list[int]:
    """The authors' 81-step evaluation grid (steps 0 ... 10^7), from ``cfg.get_training_times``.

    Step 0; 10 log-spaced steps in [251, 1e4] rounded down to multiples of 250; 90 in [1e4, 1e6] and 10 in
    [1e6, 1e7], both rounded down to multiples of 5000; duplicates removed.
    """
    steps = {0}
    steps.update(_log_spaced(251, 1e4, 10, 250))
    steps.update(_log_spaced(1e4, 1e6, 90, 5000))
    steps.update(_log_spaced(1e6, 1e7, 10, 5000))
    return sorted(steps)


class EvalSchedule:
    """The set of optimizer steps at which MemWatch evaluates.

    A schedule is the union of explicit ``steps`` and, optionally, every ``every_n_train_steps`` steps from
    ``start`` (exclusive of 0 unless ``include_zero``) up to ``stop``. Use the factories:

    Example:
        >>> EvalSchedule.auto().between(0, 3000)   # MemWatch's default
        [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1250, 1500, 1750, 2000, 2500]
        >>> EvalSchedule.every(500).next_after(0)
        500
        >>> 0 in EvalSchedule.every(500, include_zero=True)
        True
        >>> EvalSchedule.log_spaced(100, 10_000, per_decade=1).steps
        (0, 100, 1000, 10000)
        >>> len(EvalSchedule.paper().steps)
        81

    Args:
        steps: explicit steps (>= 0).
        every_n_train_steps: period in optimizer steps, or None.
        start: first periodic step is ``start + every_n_train_steps`` (``start`` itself with ``include_zero``).
        stop: last step considered for the periodic part (inclusive), or None for no end.
        include_zero: evaluate before training too (at step ``start``, normally 0).
    """

    def __init__(
        self,
        steps: Iterable[int] = (),
        every_n_train_steps: int | None = None,
        start: int = 0,
        stop: int | None = None,
        include_zero: bool = False,
    ) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise config_type_error(
                f"EvalSchedule steps must be a list of optimizer steps such as [100, 1000]; got "
                f"{type(steps).__name__} {steps!r}. For every N steps use EvalSchedule.every(N)."
            )
        explicit = sorted({check_int(s, "EvalSchedule steps", minimum=0, unit="optimizer steps") for s in steps})
        if every_n_train_steps is not None:
            every_n_train_steps = check_int(
                every_n_train_steps, "every_n_train_steps", minimum=1, unit="optimizer steps"
            )
        start = check_int(start, "start", minimum=0, unit="optimizer steps")
        stop = None if stop is None else check_int(stop, "stop", minimum=0, unit="optimizer steps")
        if stop is not None and stop < start:
            raise config_error(f"Need 0 <= start <= stop; got start={start}, stop={stop}.")
        self.every_n_train_steps = every_n_train_steps
        self.start = start
        self.stop = stop
        self.include_zero = bool(include_zero)
        if self.include_zero and self.every_n_train_steps is not None:
            explicit = sorted({*explicit, self.start})
        self._steps = tuple(explicit)
        self._name: str | None = None  # set by the named factories, for repr
        if not self._steps and self.every_n_train_steps is None:
            raise config_error(
                "Empty EvalSchedule: give `steps` or `every_n_train_steps`, or use EvalSchedule.every(N), "
                "EvalSchedule.log_spaced(start, stop) or EvalSchedule.paper()."
            )

    # -- factories -----------------------------------------------------------------------------------
    @classmethod
    def auto(cls, *, include_zero: bool = False) -> EvalSchedule:
        """MemWatch's default: every 100 optimizer steps up to step 1,000, every 250 up to 2,000, then every 500.

        Each evaluation comes at most about a quarter of the training time after the previous one from step 400
        on (100 of 400, 250 of 1,000, 500 of 2,000), so a model that copies within a thousand steps (a fine-tune
        on a few images, a small n) is still seen several times before it copies, which the onset forecast needs
        (three evaluations in the last doubling of training time); a long run pays 10 evaluations more than
        every 500 steps, all in its first 2,000 steps. ``include_zero`` adds step 0 (the model before training:
        where a fine-tune starts).
        """
        steps, first = [0] if include_zero else [], 0
        for period, last in AUTO_START:
            steps += range(first + period, last + 1, period)
            first = last
        schedule = cls(steps=steps, every_n_train_steps=AUTO_PERIOD, start=first)
        schedule._name = "EvalSchedule.auto(include_zero=True)" if include_zero else "EvalSchedule.auto()"
        return schedule

    @classmethod
    def every(
        cls, n: int, *, start: int = 0, stop: int | None = None, include_zero: bool = False
    ) -> EvalSchedule:
        """Evaluate every ``n`` optimizer steps (``start + n``, ``start + 2n``, ...)."""
        return cls(every_n_train_steps=n, start=start, stop=stop, include_zero=include_zero)

    @classmethod
    def at(cls, steps: Iterable[int]) -> EvalSchedule:
        """Evaluate at exactly these optimizer steps."""
        return cls(steps=steps)

    @classmethod
    def log_spaced(
        cls, start: int, stop: int, per_decade: int = 10, multiple: int = 1, include_zero: bool = True
    ) -> EvalSchedule:
        """About ``per_decade`` log-spaced steps per decade from ``start`` to ``stop``, rounded down to ``multiple``.

        Duplicates after rounding are dropped, so short ranges may hold fewer steps.
        """
        if not 0 < start <= stop:
            raise config_error(f"log_spaced needs 0 < start <= stop; got start={start}, stop={stop}.")
        if per_decade < 1 or multiple < 1:
            raise config_error(f"per_decade and multiple must be >= 1; got {per_decade}, {multiple}.")
        num = max(2, round(per_decade * math.log10(stop / start)) + 1) if stop > start else 1
        steps = [s for s in _log_spaced(start, stop, num, multiple) if s > 0]
        return cls(steps=[0, *steps] if include_zero else steps)

    @classmethod
    def paper(cls, stop: int | None = None) -> EvalSchedule:
        """The authors' 81-step grid (see :func:`paper_grid`), optionally cut at ``stop`` steps."""
        return cls(steps=[s for s in paper_grid() if stop is None or s <= stop])

    @classmethod
    def coerce(cls, spec: EvalSchedule | int | str | Iterable[int]) -> EvalSchedule:
        """Accept a schedule, an int (every N steps), ``"auto"`` (:meth:`auto`), ``"paper"`` (:meth:`paper`), or
        a list of steps (config files)."""
        if isinstance(spec, EvalSchedule):
            return spec
        if isinstance(spec, str):
            named = {"auto": cls.auto, "paper": cls.paper}
            if spec in named:
                return named[spec]()
            raise config_error(f"Unknown schedule name {spec!r}; the named schedules are 'auto' and 'paper'.")
        scalar = spec.item() if isinstance(spec, (Tensor, np.ndarray, np.generic)) and np.ndim(spec) == 0 else spec
        if isinstance(scalar, bool) or not isinstance(scalar, (numbers.Real, Iterable)):
            raise config_type_error(
                "schedule must be an EvalSchedule, an int (every N optimizer steps), 'paper' or a list of steps; "
                f"got {type(spec).__name__} {spec!r}."
            )
        if isinstance(scalar, numbers.Real):  # 500, 500.0, np.int64(500): every N steps; 4.5 is refused
            return cls.every(check_int(scalar, "schedule", minimum=1, unit="every N optimizer steps"))
        return cls.at(spec)

    # -- queries -------------------------------------------------------------------------------------
    @property
    def steps(self) -> tuple[int, ...]:
        """The explicit steps, sorted (the periodic part is not listed)."""
        return self._steps

    def _periodic_hit(self, step: int) -> bool:
        n = self.every_n_train_steps
        if n is None or step <= self.start or (self.stop is not None and step > self.stop):
            return False
        return (step - self.start) % n == 0

    def __contains__(self, step: object) -> bool:
        if not isinstance(step, int):
            return False
        i = bisect.bisect_left(self._steps, step)
        return (i < len(self._steps) and self._steps[i] == step) or self._periodic_hit(step)

    def next_after(self, step: int) -> int | None:
        """The first scheduled step strictly after ``step``, or None when the schedule is exhausted."""
        candidates = []
        i = bisect.bisect_right(self._steps, step)
        if i < len(self._steps):
            candidates.append(self._steps[i])
        n = self.every_n_train_steps
        if n is not None:
            k = max(step - self.start, 0) // n + 1
            periodic = self.start + k * n
            if self.stop is None or periodic <= self.stop:
                candidates.append(periodic)
        return min(candidates) if candidates else None

    def next_within(self, step: int, max_steps: int | None) -> int | None:
        """The first scheduled step ``s`` with ``step <= s <= max_steps`` (``max_steps`` None or negative:
        no end, as ``Trainer(max_steps=-1)``), or None when the schedule has none there."""
        s = step if step in self else self.next_after(step)
        if s is None or (max_steps is not None and 0 <= max_steps < s):
            return None
        return s

    def unreachable_warning(self, step: int, max_steps: int | None) -> str | None:
        """A warning when no scheduled step lies in ``[step, max_steps]`` (optimizer steps), else None."""
        if self.next_within(step, max_steps) is not None:
            return None
        first = self.next_after(step - 1)
        where = f"its first step from {step} is {first}" if first is not None else f"it has no step from {step} on"
        return (
            f"MemWatch's schedule {self!r} never fires in this fit: {where}, beyond Trainer(max_steps={max_steps}). "
            "No evaluation will run and MemWatch.history stays empty; pass a schedule with steps <= max_steps, "
            f"e.g. schedule=EvalSchedule.every({max(1, (max_steps or 10) // 10)})."
        )

    def between(self, after: int, before: int) -> list[int]:
        """Scheduled steps s with ``after < s < before`` (used to report evaluations missed at resume)."""
        out, s = [], self.next_after(after)
        while s is not None and s < before:
            out.append(s)
            s = self.next_after(s)
        return out

    # -- what MemWatch tells its schedule (an adaptive schedule plans from it; a fixed one ignores it) -------
    def observe(self, record: Mapping[str, Any]) -> None:
        """Take note of an evaluation's record; MemWatch calls it after each evaluation, on every rank. A fixed
        schedule ignores it; :class:`~lightning_memwatch.AdaptiveSchedule` plans its next step from it."""

    def state_dict(self) -> dict[str, Any]:
        """What the schedule decided so far, to resume exactly; MemWatch keeps it in its own state. A fixed
        schedule decides nothing: ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (MemWatch calls it on resume when the checkpoint holds a schedule
        state). A fixed schedule has none to restore."""

    def __repr__(self) -> str:
        if self._name is not None:
            return self._name
        parts = []
        if self._steps:
            shown = ", ".join(map(str, self._steps[:6])) + (", ..." if len(self._steps) > 6 else "")
            parts.append(f"steps=[{shown}] ({len(self._steps)} steps)")
        if self.every_n_train_steps is not None:
            parts.append(
                f"every_n_train_steps={self.every_n_train_steps}, start={self.start}, stop={self.stop}"
            )
        return f"EvalSchedule({'; '.join(parts)})"

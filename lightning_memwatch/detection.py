"""The paper's two timescales, flagged from per-evaluation records: tau_gen (samples become good) and tau_mem
(memorization emerges).

The forecast of tau_mem for a new n by the linear law tau_mem = slope * n (:class:`TauMemForecast`,
:func:`forecast_tau_mem`, :func:`fit_summary`) lives in :mod:`lightning_memwatch.fits` and is re-exported here.

Each tau_gen rule gives a verdict first (its numbers: :class:`FloorVerdict`, :class:`PlateauVerdict`), described
in sentences apart (the event's reason, the status line).

Pure Python: no Lightning import. A record is a mapping (an :class:`~lightning_memwatch.EvalRecord`, or a
plain dict with the same keys) with at least ``"step"`` (optimizer steps) and, for
the default rules, ``"f_mem"``, ``"f_mem_ci_low"`` (fractions in [0, 1]) and a quality signal (``"fid"`` by
default; lower is better). :class:`TimescaleDetector` consumes records one at a time (online, as
:class:`~lightning_memwatch.MemWatch` does after each evaluation); :func:`detect_timescales` applies the same
detector to a complete history, so online and offline flags are equal by construction.

Rules and their defaults (times are the ``step`` of an evaluation, in optimizer steps):

* **tau_gen, rule "plateau"** (default without a floor): the first evaluation, at step t, at which the best
  quality of the evaluations in the window ``(t / window_factor, t]`` improves on the best quality of the
  evaluations at steps ``<= t / window_factor`` by less than ``rel_tol=0.05`` (relative), provided the best
  quality so far has improved on the first evaluation's by at least ``min_improvement=0.2`` (relative).
  With ``window_factor=2``: "FID gained less than 5% while training time doubled". The window is a factor in
  training time, not a number of evaluations, so the flag does not depend on how often you evaluate (a linear
  schedule and the paper's log-spaced grid, about 3 evaluations per doubling, flag the same time up to grid
  resolution), and it is scale-free: curves that collapse under t -> W t (the paper's width scaling) give
  flags that scale the same way. 5% sits above the sampling noise of FID on a few thousand images. The flag
  is causal: FID must already have been on its plateau at t / 2, so the flag comes up to a factor
  ``window_factor`` after the visual start of the plateau (a constant shift on the paper's log axes; pass
  ``window_factor=1.5`` or use the floor rule for a tighter flag). The improvement requirement keeps a
  signal that is flat from the start (a model that has not started learning, FID stuck near 300) from being
  called "generating well": such a signal never flags tau_gen. If your schedule starts after the plateau,
  pass ``min_improvement=0`` (or use the floor rule). The event's ``step`` is the onset of the plateau (the
  first evaluation whose quality is within the tolerance of the plateau's level); ``confirmed_step`` is the
  evaluation at which the causal rule confirmed it.
* **noise allowance** (plateau rule, ``noise_z=2``): a quality signal measured on a finite sample (FID on
  1000 images: sd 10-12 at FD 230-260, 4-5%, on the zoo's MLP plateau at n = 8) moves by more than
  ``rel_tol`` on a true plateau, so a fixed 5% would wait for lucky draws. The rule measures the noise from
  the evaluations in the window themselves: each is compared with the straight line through its two
  neighbours (a linear trend leaves no residual), and the median of the normalised residuals over 0.6745 is
  the noise sd s (robust to one outlier; measured once the window holds 5 evaluations, 0 before). A gain
  below ``noise_z * sqrt(2) * s`` (the noise of a difference of two evaluations, 2 sd) is no gain, and the
  onset is the first evaluation within ``max(rel_tol x level, noise_z * s)`` of the level. A curve that falls
  by more than that noise over a doubling of training time is still falling and is not flagged;
  ``noise_z=0`` gives the rule without the allowance. The allowance is capped at ``max_noise_allowance``
  (25%, five times ``rel_tol``): a gain of more than a quarter of the distance over a doubling of training
  time is a fall however noisy the window (measured: the zoo's MLP, evaluated every 100 steps, had FDs 394,
  330, 450, 368, 264 over steps 500-900, an uncapped allowance of 84% against a gain of 42%, while its FD
  went on falling to 182 by step 4500).
* **reference level** (default rule, when given by :meth:`TimescaleDetector.set_reference_floor`; MemWatch
  gives FID(training images, reference) when FID is on, logged as ``memwatch/fid_train_floor``): the plateau
  rule then measures gains relative to the distance above this level, so a feature space with an offset
  (a custom FID feature extractor) has a scale, and quality within ``eps`` of the training images' own level
  flags tau_gen at once. ``floor="train"`` uses the same level for the floor rule.
* **tau_gen, rule "floor"** (default when ``floor`` is given): the first evaluation whose quality is within
  ``eps=0.1`` (relative) of a reference floor, e.g. FID(train, test): ``quality <= (1 + eps) * floor``. This
  is the rule of a third-party reproduction of the paper (tol 0.1 to 0.5); 0.1 is the strict end.
* Records whose quality value is missing, ``None`` (FID off), non-numeric or not finite are skipped by the
  tau_gen rules. When FID is off, log another quality signal (``MemWatch(metrics={"val_loss": fn})`` puts it
  in every record) and pass ``quality_key="val_loss"``; with no quality signal tau_gen never fires (no error).
* **tau_mem, rule "ci"** (default): the bootstrap confidence interval's lower bound ``f_mem_ci_low > f0``
  (``f0=0``): the paper's strict "f_mem leaves zero" criterion, protected from single false copies (with
  1000 samples and a 95% interval, one memorized sample leaves the lower bound at 0).
* **tau_mem, rule "threshold"**: ``f_mem > f0``.
* **per class** (class-conditional models, records with ``per_class``): each generated class's f_mem gets the
  same tau_mem rule, ``f0`` and patience, and fires its own ``tau_mem`` event carrying the class
  (``event.label``; :attr:`TimescaleDetector.class_tau_mem`). A class with fewer than ``min_class_samples=20``
  samples in an evaluation is not decided there (its interval spans more than 17 points even when none is
  copied: Clopper-Pearson 0 of 20 is [0, 0.168]); the status line says so. Memorization is judged against the
  whole training set either way.
* **patience** (tau_mem): the condition must hold at ``patience`` consecutive evaluations before tau_mem is
  flagged, as Lightning's ``EarlyStopping`` counts bad checks: ``patience=0`` and ``patience=1`` both flag at
  the first evaluation that meets the condition. The event's ``step`` is the *first* evaluation of the
  consecutive run (the onset of memorization); ``confirmed_step`` is the evaluation at which it was flagged.
  Records without the needed f_mem value neither extend nor break a run.

Every flag is final once raised. The detector's state is plain Python (``state_dict``/``load_state_dict``),
so flags survive a resume from a Lightning checkpoint.

Example:
    >>> history = [{"step": s, "f_mem": f, "f_mem_ci_low": f / 2, "fid": q}
    ...            for s, f, q in [(0, 0.0, 300.0), (500, 0.0, 60.0), (1000, 0.0, 20.0), (1500, 0.0, 19.5),
    ...                            (2000, 0.0, 19.4), (2500, 0.0, 19.6), (3000, 0.2, 19.0)]]
    >>> tau_gen, tau_mem = detect_timescales(history)
    >>> tau_gen.confirmed_step, tau_mem.step  # FID(2000) = 19.4 is within 5% of the best up to step 1000
    (2000, 3000)
    >>> tau_gen.step  # the plateau began at step 1000: FID 20.0 is within 5% of its level (19.4)
    1000
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from lightning_memwatch._arguments import check_choice, check_float, check_int, config_error
from lightning_memwatch.fits import TauMemForecast, fit_summary, forecast_tau_mem  # their home; re-exported here
from lightning_memwatch.record import RecordField
from lightning_memwatch.record import finite_float as _finite_float  # how every record value is read

__all__ = [
    "TauMemForecast",
    "TimescaleDetector",
    "TimescaleEvent",
    "detect_timescales",
    "fit_summary",
    "forecast_tau_mem",
]

GenRule = Literal["auto", "plateau", "floor"]
"""The tau_gen rules (``"auto"``: ``"floor"`` when a floor is given, else ``"plateau"``)."""
MemRule = Literal["ci", "threshold"]
"""The tau_mem rules."""
QualityMode = Literal["min", "max"]
"""Whether lower (``"min"``) or higher (``"max"``) quality values are better."""
_GEN_RULES: tuple[str, ...] = get_args(GenRule)
_MEM_RULES: tuple[str, ...] = get_args(MemRule)
QUALITY_MODES: tuple[str, ...] = get_args(QualityMode)
_MEM_KEYS = {"ci": RecordField.F_MEM_CI_LOW, "threshold": RecordField.F_MEM}  # the field each tau_mem rule tests
_STATE_VERSION = 1
_MAD_TO_SD = 0.6745  # median |N(0, 1)|: median absolute residual / 0.6745 estimates a standard deviation
_MIN_NOISE_RESIDUALS = 3  # evaluations in the plateau window, minus 2, before its noise is measured


@dataclass(frozen=True)
class TimescaleEvent:
    """One flagged timescale.

    Attributes:
        name: ``"tau_gen"`` or ``"tau_mem"``.
        step: the timescale (optimizer steps): the step of the evaluation that met the rule (for tau_mem
            with patience, the first evaluation of the consecutive run).
        rule: the rule that fired (``"plateau"``, ``"floor"``, ``"ci"`` or ``"threshold"``).
        reason: a human-readable sentence with the numbers that made the rule fire.
        value: the tested value at ``step`` (the quality signal for tau_gen; ``f_mem_ci_low`` or ``f_mem``
            for tau_mem).
        confirmed_step: the step of the evaluation at which the flag was raised (``>= step``; equal to
            ``step`` except for tau_mem with ``patience > 1`` and tau_gen's plateau rule, whose ``step`` is
            the first evaluation of the plateau). Defaults to ``step``.
        label: the class of a per-class tau_mem event (class-conditional models), None for the global flags.
    """

    name: str
    step: int
    rule: str
    reason: str
    value: float
    confirmed_step: int = -1
    label: int | None = None

    def __post_init__(self) -> None:
        if self.confirmed_step < 0:
            object.__setattr__(self, "confirmed_step", self.step)

    def to_dict(self) -> dict[str, Any]:
        """The event as a dict of plain Python values (for checkpoints and JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TimescaleEvent:
        """Inverse of :meth:`to_dict`."""
        return cls(
            name=str(data["name"]),
            step=int(data["step"]),
            rule=str(data["rule"]),
            reason=str(data["reason"]),
            value=float(data["value"]),
            confirmed_step=int(data.get("confirmed_step", -1)),
            label=None if data.get("label") is None else int(data["label"]),
        )


def _relative_gain(reference: float, new: float) -> float:
    """How much ``new`` improves on ``reference`` (lower is better), relative to ``|reference|``."""
    gain = reference - new
    if reference == 0.0:
        return 0.0 if gain == 0.0 else math.copysign(math.inf, gain)
    return gain / abs(reference)


def _noise_sd(points: Sequence[Sequence[float]]) -> float:
    """Robust estimate of the evaluation-to-evaluation noise (standard deviation) of ``[step, value]`` points.

    Each inner point is compared with the straight line through its two neighbours; for white noise of
    standard deviation s that residual has standard deviation ``s * sqrt(1 + a^2 + b^2)`` (``a``, ``b`` the
    interpolation weights, ``a + b = 1``), so the normalised residuals estimate s whatever the grid, and a
    linear trend leaves them at 0. The median of their magnitudes over 0.6745 (the normal MAD) resists one
    outlier. 0.0 with fewer than ``_MIN_NOISE_RESIDUALS`` residuals (``+ 2`` points): one or two residuals
    are too noisy themselves (a single bump of a falling curve would pass for noise).
    """
    scaled = []
    for (s0, v0), (s1, v1), (s2, v2) in zip(points, points[1:], points[2:]):
        b = (s1 - s0) / (s2 - s0)  # weight of the right neighbour
        a = 1.0 - b
        scaled.append(abs(v1 - (a * v0 + b * v2)) / math.sqrt(1.0 + a * a + b * b))
    if len(scaled) < _MIN_NOISE_RESIDUALS:
        return 0.0
    scaled.sort()
    mid = len(scaled) // 2
    median = scaled[mid] if len(scaled) % 2 else 0.5 * (scaled[mid - 1] + scaled[mid])
    return median / _MAD_TO_SD


@dataclass
class _GenState:
    first: float | None = None  # first quality value (oriented: lower is better)
    best_before: float | None = None  # best value at steps <= t / window_factor
    recent: list[list[float]] = field(default_factory=list)  # [step, value] of the evaluations after that
    seen: list[list[float]] = field(default_factory=list)  # [step, value] of every usable evaluation
    status: str = ""  # where the tau_gen rule stands after the last record


@dataclass
class _MemState:
    run_start: int | None = None  # step of the first evaluation of the current run meeting the condition
    run_value: float | None = None  # the tested value at run_start
    run_length: int = 0


class TimescaleDetector:
    """Flag tau_gen and tau_mem online, one evaluation record at a time.

    See the module docstring for the rules and the rationale of their defaults.

    Args:
        quality_key: record key of the quality signal used for tau_gen (``"fid"``; any user metric merged into
            the records works, e.g. a validation loss).
        quality_mode: ``"min"`` when lower quality values are better (FID, losses), ``"max"`` otherwise.
        gen_rule: ``"plateau"``, ``"floor"`` or ``"auto"`` (``"floor"`` when ``floor`` is given, else
            ``"plateau"``).
        window_factor: the plateau window at step t covers steps ``(t / window_factor, t]`` (> 1).
        rel_tol: the plateau rule fires when the best quality in the window improves on the best before it by
            less than this fraction.
        min_improvement: the plateau rule needs the best quality so far to have improved on the first
            evaluation's by at least this fraction (0 disables the requirement).
        noise_z: a gain of the plateau rule also counts as no gain while it is below ``noise_z`` standard
            deviations of the difference of two evaluations, the noise measured from the window's own
            evaluations (0 disables the noise allowance: only ``rel_tol`` counts).
        max_noise_allowance: the largest gain the noise allowance excuses (a fraction, like ``rel_tol``): a
            larger gain over the window is a fall whatever the noise; None: no cap.
        floor: reference quality for the floor rule (e.g. FID(train, test)), in the signal's units, or
            ``"train"``: the FID of the training images against the reference, computed by MemWatch at setup.
        eps: the floor rule fires at ``quality <= (1 + eps) * floor`` (``>= (1 - eps) * floor`` in max mode).
        mem_rule: ``"ci"`` (``f_mem_ci_low > f0``) or ``"threshold"`` (``f_mem > f0``).
        f0: memorized fraction that counts as "zero" (in [0, 1); the paper's strict criterion is 0).
        patience: consecutive evaluations meeting the tau_mem condition before the flag (0 and 1: the first).
        min_class_samples: per-class tau_mem: fewest samples of a class in an evaluation for its rule to decide
            there (images); fewer neither extend nor break the class's run.

    Attributes:
        tau_gen: the tau_gen event, or None until it fires.
        tau_mem: the tau_mem event, or None until it fires.
        class_tau_mem: ``{class: tau_mem event}`` of the classes flagged so far (class-conditional models).
        last_step: step of the last record consumed, or None.
        num_records: records consumed so far.

    Example:
        >>> detector = TimescaleDetector(floor=10.0)
        >>> detector.update({"step": 100, "f_mem": 0.0, "f_mem_ci_low": 0.0, "fid": 50.0})
        []
        >>> [e.name for e in detector.update({"step": 200, "f_mem": 0.0, "f_mem_ci_low": 0.0, "fid": 10.5})]
        ['tau_gen']
        >>> detector.tau_gen.step, detector.tau_gen.rule
        (200, 'floor')
    """

    def __init__(
        self,
        *,
        quality_key: str = "fid",
        quality_mode: QualityMode = "min",
        gen_rule: GenRule = "auto",
        window_factor: float = 2.0,
        rel_tol: float = 0.05,
        min_improvement: float = 0.2,
        noise_z: float = 2.0,
        max_noise_allowance: float | None = 0.25,
        floor: float | Literal["train"] | None = None,
        eps: float = 0.1,
        mem_rule: MemRule = "ci",
        f0: float = 0.0,
        patience: int = 0,
        min_class_samples: int = 20,
    ) -> None:
        if not isinstance(quality_key, str) or not quality_key:
            raise config_error(f"quality_key must be a non-empty record key (e.g. 'fid'); got {quality_key!r}.")

        self.quality_key = quality_key
        self.quality_mode = check_choice(quality_mode, "quality_mode", QUALITY_MODES)
        check_choice(gen_rule, "gen_rule", _GEN_RULES)
        self.floor_source: str | None = "train" if floor == "train" else None
        if floor == "train":
            floor = math.nan  # set by MemWatch at setup (FID of the training images against the reference)
        elif floor is not None and _finite_float(floor) is None:
            raise config_error(
                f"floor must be a finite number (e.g. FID(train, test)), 'train' or None; got {floor!r}."
            )
        if gen_rule == "floor" and floor is None:
            raise config_error(
                "gen_rule='floor' needs a reference floor: pass floor=<quality of real data, e.g. "
                "FID(train, test)>, or use gen_rule='plateau'."
            )
        if gen_rule == "plateau" and floor is not None:
            raise config_error(
                f"floor={floor} is set but gen_rule='plateau' ignores it: use gen_rule='floor' (or 'auto'), "
                "or drop floor."
            )
        self.gen_rule: str = ("floor" if floor is not None else "plateau") if gen_rule == "auto" else gen_rule
        self._auto = gen_rule == "auto" and floor is None  # the plateau rule may take a reference floor later
        self.reference_floor: float | None = None
        window_factor = float(window_factor)
        if not 1.0 < window_factor < math.inf:
            raise config_error(
                f"window_factor must be a finite number > 1 (2 compares each step t with steps <= t / 2); "
                f"got {window_factor}."
            )
        self.window_factor = window_factor
        self.rel_tol = check_float(rel_tol, "rel_tol", low=0)
        self.min_improvement = check_float(min_improvement, "min_improvement", low=0)
        self.noise_z = check_float(noise_z, "noise_z", low=0)
        self.max_noise_allowance = (
            None if max_noise_allowance is None else check_float(max_noise_allowance, "max_noise_allowance", low=0)
        )
        self.floor: float | None = None if floor is None or self.floor_source else float(floor)
        self.eps = check_float(eps, "eps", low=0)
        self.mem_rule = check_choice(mem_rule, "mem_rule", _MEM_RULES)
        f0 = float(f0)
        if not 0.0 <= f0 < 1.0:
            raise config_error(f"f0 must lie in [0, 1) (a memorized fraction; the paper uses 0); got {f0}.")
        self.f0 = f0
        self.patience = check_int(patience, "patience", minimum=0, unit="evaluations")
        self.min_class_samples = check_int(min_class_samples, "min_class_samples", minimum=1, unit="images")

        self.tau_gen: TimescaleEvent | None = None
        self.tau_mem: TimescaleEvent | None = None
        self.last_step: int | None = None
        self.num_records = 0
        self._gen = _GenState()
        self._mem = _MemState()
        self.class_tau_mem: dict[int, TimescaleEvent] = {}
        self._class_mem: dict[int, _MemState] = {}
        self._class_notes: dict[int, str] = {}  # classes too small to decide at the last record

    # -- configuration -----------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The resolved rule settings as plain Python values (``gen_rule`` is never ``"auto"`` here)."""
        return {
            "quality_key": self.quality_key,
            "quality_mode": self.quality_mode,
            "gen_rule": self.gen_rule,
            "window_factor": self.window_factor,
            "rel_tol": self.rel_tol,
            "min_improvement": self.min_improvement,
            "noise_z": self.noise_z,
            "max_noise_allowance": self.max_noise_allowance,
            "floor": self.floor_source or self.floor,
            "eps": self.eps,
            "mem_rule": self.mem_rule,
            "f0": self.f0,
            "patience": self.patience,
            "min_class_samples": self.min_class_samples,
        }

    def set_reference_floor(self, value: float | None) -> None:
        """Give the detector the quality of real data, e.g. FID(train images, reference) (MemWatch does, at setup).

        With ``floor="train"`` it becomes the floor rule's floor. With the default rule (``gen_rule="auto"``
        and no floor) it gives the plateau rule a scale: gains count relative to the distance above this
        level (``best - floor``) rather than to the quality value itself, so an offset of the feature space
        does not make a falling curve look flat, and reaching ``(1 + eps) x`` the level flags tau_gen too.
        Other settings ignore it. None or a non-finite value clears it.
        """
        value = _finite_float(value)
        self.reference_floor = value
        if self.floor_source == "train":
            self.floor = value

    @property
    def status(self) -> str:
        """Where each rule stands after the last record, e.g. for a verbose evaluation line."""
        gen = f"tau_gen at step {self.tau_gen.step}" if self.tau_gen is not None else (self._gen.status or "tau_gen: -")
        if self.tau_mem is not None:
            mem = f"tau_mem at step {self.tau_mem.step}"
        else:
            tested = _MEM_KEYS[self.mem_rule]
            mem = f"tau_mem: {tested} > {self.f0:g} for {self._mem.run_length}/{self.required_consecutive} evaluations"
        return f"{gen}; {mem}{self._class_status()}"

    def _class_status(self) -> str:
        """The per-class part of :attr:`status` (empty for unconditional records)."""
        parts = [f"class {k} at step {e.step}" for k, e in sorted(self.class_tau_mem.items())]
        text = f"; tau_mem per class: {', '.join(parts)}" if parts else ""
        if self._class_notes:
            text += "; " + ", ".join(self._class_notes.values())
        return text

    @property
    def run_length(self) -> int:
        """Consecutive evaluations, up to the last record, that met the tau_mem condition (evaluations)."""
        return self._mem.run_length

    @property
    def required_consecutive(self) -> int:
        """Consecutive evaluations meeting the tau_mem condition needed to flag it: ``max(1, patience)``."""
        return max(1, self.patience)

    # -- per-record tests ----------------------------------------------------------------------------------
    def quality(self, record: Mapping[str, object]) -> float | None:
        """The record's quality value (``quality_key``) as a finite float, or None when unusable."""
        return _finite_float(record.get(self.quality_key))

    def memorization_value(self, record: Mapping[str, object]) -> float | None:
        """The value the tau_mem rule tests (``f_mem_ci_low`` or ``f_mem``), or None when missing."""
        return _finite_float(record.get(_MEM_KEYS[self.mem_rule]))

    def is_memorizing(self, record: Mapping[str, object]) -> bool:
        """Whether one record meets the tau_mem condition (before patience is applied)."""
        value = self.memorization_value(record)
        return value is not None and value > self.f0

    def _oriented(self, value: float) -> float:
        return value if self.quality_mode == "min" else -value

    # -- online update ---------------------------------------------------------------------------------
    def update(self, record: Mapping[str, object]) -> list[TimescaleEvent]:
        """Consume the next evaluation's record; return the events it newly fired (at most one of each).

        Args:
            record: ``{"step": int, "f_mem": float, "f_mem_ci_low": float, <quality_key>: float, ...}``
                (the quality may be None); steps must increase from record to record. Not modified.

        Raises:
            ValueError: when ``step`` is missing, not an integer, or not larger than the previous record's.
        """
        step = self._check_step(record)
        events: list[TimescaleEvent] = []
        gen_event = self._update_gen(record, step)
        if gen_event is not None:
            self.tau_gen = gen_event
            events.append(gen_event)
        mem_event = self._update_mem(record, step)
        if mem_event is not None:
            self.tau_mem = mem_event
            events.append(mem_event)
        events += self._update_classes(record, step)
        self.last_step = step
        self.num_records += 1
        return events

    def _check_step(self, record: Mapping[str, object]) -> int:
        if not isinstance(record, Mapping) or RecordField.STEP not in record:
            raise config_error(
                "Each record must be a mapping with a 'step' key (optimizer steps), like MemWatch.history's; "
                f"got {record!r}."
            )
        raw = record[RecordField.STEP]
        if isinstance(raw, bool) or not isinstance(raw, int):
            try:
                step = int(raw)  # type: ignore[call-overload]
            except (TypeError, ValueError):
                step = None
            if step is None or step != raw:
                raise config_error(f"record['step'] must be an integer number of optimizer steps; got {raw!r}.")
        else:
            step = raw
        if step < 0:
            raise config_error(f"record['step'] must be >= 0 (optimizer steps); got {step}.")
        if self.last_step is not None and step <= self.last_step:
            raise config_error(
                f"Records must arrive in increasing step order: got step {step} after step {self.last_step}. "
                "Feed each evaluation once, in training order (after a resume, load the detector's state "
                "instead of replaying old records)."
            )
        return step

    def _update_gen(self, record: Mapping[str, object], step: int) -> TimescaleEvent | None:
        """The tau_gen rules at one record: their verdicts (numbers) first, then the sentences describing them."""
        raw = self.quality(record)
        if raw is None or self.tau_gen is not None:  # unusable value, or the flag is final already
            return None
        boundary = self._advance_gen_window(self._oriented(raw), step)
        state = self._gen
        floor_raw = self.floor if self.gen_rule == "floor" else (self.reference_floor if self._auto else None)
        if floor_raw is not None:
            floor = self._floor_verdict(raw, floor_raw)
            if floor.fired:
                return TimescaleEvent("tau_gen", step, "floor", _describe_floor(self, floor, fired=True), raw)
            state.status = _describe_floor(self, floor, fired=False)
        elif self.gen_rule == "floor":
            state.status = "tau_gen: waiting for the train floor"
        if self.gen_rule == "floor":
            return None
        plateau = self._plateau_verdict(step, boundary, floor_raw)
        if plateau is None:  # nothing before the window, or nothing in it
            state.status = state.status or f"tau_gen: no evaluation at or before step {boundary:.6g} yet"
            return None
        status = _plateau_status(self, plateau)
        state.status = f"{state.status}; {status}" if floor_raw is not None else f"tau_gen {status}"
        if not plateau.fired:
            return None
        assert plateau.onset_step is not None and plateau.onset_value is not None
        onset_raw = self._oriented(plateau.onset_value)
        return TimescaleEvent(
            "tau_gen", plateau.onset_step, "plateau", _plateau_reason(self, plateau), onset_raw, step
        )

    def _advance_gen_window(self, q: float, step: int) -> float:
        """Take the oriented quality ``q`` at ``step`` into the plateau window ``(step / window_factor, step]``;
        the evaluations it leaves go into the best before it. Returns the window's lower boundary (steps)."""
        state = self._gen
        if state.first is None:
            state.first = q
        state.recent.append([float(step), q])
        state.seen.append([float(step), q])
        boundary = step / self.window_factor
        while state.recent and state.recent[0][0] <= boundary:
            dropped = state.recent.pop(0)[1]
            state.best_before = dropped if state.best_before is None else min(state.best_before, dropped)
        return boundary

    def _floor_verdict(self, raw: float, floor_raw: float) -> FloorVerdict:
        """Whether ``raw`` quality lies within ``(1 + eps)`` of the floor (``1 - eps`` in max mode)."""
        floor = self._oriented(floor_raw)
        limit = floor + self.eps * abs(floor)
        return FloorVerdict(raw, floor_raw, self._oriented(limit), self._oriented(raw) <= limit)

    def _plateau_verdict(self, step: int, boundary: float, floor_raw: float | None) -> PlateauVerdict | None:
        """The plateau rule's numbers at ``step`` (None while the window or the part before it is empty): the
        window's gain on the best before it, against the tolerance (``rel_tol`` or the noise allowance), the
        improvement since the first evaluation, and the onset of the plateau when the rule fires. With a floor
        (the training images' level), gains are relative to the distance above it."""
        state = self._gen
        if state.best_before is None or not state.recent or state.first is None:
            return None
        best_recent = min(value for _, value in state.recent)
        best = min(state.best_before, best_recent)
        ref = self._oriented(floor_raw) if floor_raw is not None else 0.0
        denominator = abs(state.best_before - ref)  # what _relative_gain divides by
        gain = _relative_gain(state.best_before - ref, best_recent - ref)
        total = _relative_gain(state.first - ref, best - ref)
        # a gain below the noise of a difference of two evaluations is no gain: sqrt(2) x the window's noise
        noise = self.noise_z * math.sqrt(2.0) * _noise_sd(state.recent)
        if denominator > 0.0:
            allowance = noise / denominator
        else:
            allowance = math.inf if noise > 0.0 else 0.0
        tol = max(self.rel_tol, allowance)
        if self.max_noise_allowance is not None:  # the noise excuses a gain up to this much, no more
            tol = min(tol, max(self.rel_tol, self.max_noise_allowance))
        fired = gain < tol and total >= self.min_improvement
        onset_step = onset_value = None
        if fired:  # the first evaluation already within the tolerance (rel_tol or the noise) of the plateau's level
            scale = max(best - ref, 0.0) if floor_raw is not None else abs(best)
            within = max(self.rel_tol * scale, noise / math.sqrt(2.0))  # one evaluation against the level: z x sd
            onset_step, onset_value = next((int(s), v) for s, v in state.seen if v <= best + within)
        return PlateauVerdict(
            step=step,
            boundary=boundary,
            best_before=state.best_before,
            best_recent=best_recent,
            gain=gain,
            total=total,
            tol=tol,
            allowance=allowance,
            noise=noise,
            fired=fired,
            onset_step=onset_step,
            onset_value=onset_value,
            above_floor=floor_raw is not None,
        )

    def _update_mem(self, record: Mapping[str, object], step: int) -> TimescaleEvent | None:
        value = self.memorization_value(record)
        if value is None:  # no f_mem in this record: neither extends nor breaks a run
            return None
        return self._advance_run(self._mem, value, step, flagged=self.tau_mem is not None, label=None)

    def _advance_run(
        self, state: _MemState, value: float, step: int, *, flagged: bool, label: int | None
    ) -> TimescaleEvent | None:
        """The tau_mem rule with patience on one run (global or one class's): the event once it is confirmed."""
        if value > self.f0:
            if state.run_length == 0:
                state.run_start, state.run_value = step, value
            state.run_length += 1
        else:
            state.run_start, state.run_value, state.run_length = None, None, 0
        if flagged or state.run_length < self.required_consecutive:
            return None
        assert state.run_start is not None and state.run_value is not None
        tested = _MEM_KEYS[self.mem_rule]
        whose = "" if label is None else f"class {label}: "
        reason = f"{whose}{tested} = {state.run_value:.4g} > f0 = {self.f0:g} at step {state.run_start}"
        if self.required_consecutive > 1:
            reason += (
                f", held for {state.run_length} consecutive evaluations (patience {self.patience}), "
                f"confirmed at step {step}"
            )
        return TimescaleEvent("tau_mem", state.run_start, self.mem_rule, reason, state.run_value, step, label)

    def classes_memorizing(self, record: Mapping[str, object]) -> list[int]:
        """The classes of ``record.per_class`` meeting the tau_mem condition at this record (before patience),
        among those with at least ``min_class_samples`` samples."""
        out = []
        for label, entry in _per_class(record).items():
            value = _finite_float(entry.get(_MEM_KEYS[self.mem_rule]))
            count = _finite_float(entry.get(RecordField.NUM_SAMPLES))
            enough = count is None or count >= self.min_class_samples
            if value is not None and value > self.f0 and enough:
                out.append(label)
        return out

    def _update_classes(self, record: Mapping[str, object], step: int) -> list[TimescaleEvent]:
        """Per-class tau_mem: the global rule and patience on each class's f_mem; small classes undecided."""
        events: list[TimescaleEvent] = []
        self._class_notes = {}
        for label, entry in _per_class(record).items():
            count = _finite_float(entry.get(RecordField.NUM_SAMPLES))
            if count is not None and count < self.min_class_samples:
                self._class_notes[label] = (
                    f"class {label}: {int(count)} samples < min_class_samples {self.min_class_samples}, not decided"
                )
                continue
            value = _finite_float(entry.get(_MEM_KEYS[self.mem_rule]))
            if value is None:
                continue
            state = self._class_mem.setdefault(label, _MemState())
            event = self._advance_run(state, value, step, flagged=label in self.class_tau_mem, label=label)
            if event is not None:
                self.class_tau_mem[label] = event
                events.append(event)
        return events

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Flags, rule state and settings as plain Python values (checkpoint- and JSON-safe)."""
        return {
            "version": _STATE_VERSION,
            "config": self.config(),
            "tau_gen": None if self.tau_gen is None else self.tau_gen.to_dict(),
            "tau_mem": None if self.tau_mem is None else self.tau_mem.to_dict(),
            "last_step": self.last_step,
            "num_records": self.num_records,
            "gen": {
                "first": self._gen.first,
                "best_before": self._gen.best_before,
                "recent": [list(pair) for pair in self._gen.recent],
                "seen": [list(pair) for pair in self._gen.seen],
                "status": self._gen.status,
            },
            "reference_floor": self.reference_floor,
            "mem": {
                "run_start": self._mem.run_start,
                "run_value": self._mem.run_value,
                "run_length": self._mem.run_length,
            },
            "classes": {
                int(k): {
                    "run_start": s.run_start,
                    "run_value": s.run_value,
                    "run_length": s.run_length,
                    "tau_mem": None if k not in self.class_tau_mem else self.class_tau_mem[k].to_dict(),
                }
                for k, s in sorted(self._class_mem.items())
            },
            "class_notes": dict(self._class_notes),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore flags and rule state saved by :meth:`state_dict` (the input is not modified).

        The rule settings of this detector are kept; when they differ from the saved ones a warning says
        which, since flags already raised stay final while later evaluations follow the new settings.
        """
        version = state_dict.get("version")
        if version != _STATE_VERSION:
            raise config_error(
                f"Unsupported TimescaleDetector state version {version!r} (this version reads "
                f"{_STATE_VERSION})."
            )
        saved = state_dict.get("config", {})
        changed = {k: (saved[k], v) for k, v in self.config().items() if k in saved and saved[k] != v}
        if changed:
            listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            warnings.warn(
                f"TimescaleDetector settings differ from the checkpoint's ({listed}); flags already raised "
                "are kept, later evaluations follow the new settings.",
                UserWarning,
                stacklevel=2,
            )
        tau_gen, tau_mem = state_dict.get("tau_gen"), state_dict.get("tau_mem")
        self.tau_gen = None if tau_gen is None else TimescaleEvent.from_dict(tau_gen)
        self.tau_mem = None if tau_mem is None else TimescaleEvent.from_dict(tau_mem)
        self.last_step = None if state_dict.get("last_step") is None else int(state_dict["last_step"])
        self.num_records = int(state_dict.get("num_records", 0))
        gen, mem = state_dict["gen"], state_dict["mem"]
        self._gen = _GenState(
            first=gen["first"],
            best_before=gen["best_before"],
            recent=[[float(s), float(v)] for s, v in gen["recent"]],
            seen=[[float(s), float(v)] for s, v in gen.get("seen", gen["recent"])],
            status=str(gen.get("status", "")),
        )
        if state_dict.get("reference_floor") is not None and self.reference_floor is None:
            self.set_reference_floor(state_dict["reference_floor"])
        self._mem = _MemState(
            run_start=mem["run_start"], run_value=mem["run_value"], run_length=int(mem["run_length"])
        )
        classes = state_dict.get("classes") or {}  # absent from states saved before per-class flags
        self._class_mem = {
            int(k): _MemState(run_start=c["run_start"], run_value=c["run_value"], run_length=int(c["run_length"]))
            for k, c in classes.items()
        }
        self.class_tau_mem = {
            int(k): TimescaleEvent.from_dict(c["tau_mem"]) for k, c in classes.items() if c.get("tau_mem")
        }
        self._class_notes = {int(k): str(v) for k, v in (state_dict.get("class_notes") or {}).items()}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"TimescaleDetector({settings})"


def _per_class(record: Mapping[str, object]) -> dict[int, Any]:
    """``record["per_class"]`` as ``{class: entry with .get(field)}`` (empty for unconditional records)."""
    entries = record.get(RecordField.PER_CLASS) if isinstance(record, Mapping) else None
    if not isinstance(entries, Mapping):
        return {}
    return {int(k): v for k, v in sorted(entries.items(), key=lambda kv: int(kv[0])) if hasattr(v, "get")}


# -- the tau_gen rules' verdicts (numbers) and their descriptions (sentences) ---------------------------------
@dataclass(frozen=True)
class FloorVerdict:
    """The floor rule at one evaluation, in the quality's own units.

    Attributes:
        value: the quality.
        floor: the floor (the given one, or the training images' level).
        limit: ``(1 + eps) x floor`` (``1 - eps`` in max mode): the quality must reach it.
        fired: whether it did.
    """

    value: float
    floor: float
    limit: float
    fired: bool


@dataclass(frozen=True)
class PlateauVerdict:
    """The plateau rule at one evaluation; qualities oriented (lower is better), gains as fractions.

    Attributes:
        step: the evaluation (optimizer steps).
        boundary: the window is ``(boundary, step]`` (``step / window_factor``).
        best_before: best quality at steps ``<= boundary``.
        best_recent: best quality in the window.
        gain: how much the window improves on the best before it (relative; to the distance above the floor
            when ``above_floor``).
        total: the improvement of the best so far on the first evaluation (relative, likewise).
        tol: the tolerance the gain is held against: ``rel_tol``, or the noise allowance when larger (at most
            ``max_noise_allowance``).
        allowance: the noise allowance before its cap (a fraction, like ``gain``).
        noise: ``noise_z x sqrt(2) x`` the window's noise sd (quality units).
        fired: ``gain < tol`` and ``total >= min_improvement``.
        onset_step: the plateau's first evaluation (steps) when fired, else None.
        onset_value: its quality (oriented) when fired, else None.
        above_floor: whether gains are relative to the distance above the training images' level.
    """

    step: int
    boundary: float
    best_before: float
    best_recent: float
    gain: float
    total: float
    tol: float
    allowance: float
    noise: float
    fired: bool
    onset_step: int | None
    onset_value: float | None
    above_floor: bool


def _sides(detector: TimescaleDetector) -> tuple[str, str]:
    return ("<=", "+") if detector.quality_mode == "min" else (">=", "-")


def _describe_floor(detector: TimescaleDetector, verdict: FloorVerdict, *, fired: bool) -> str:
    """The floor rule's event reason (``fired``) or its status line."""
    key = detector.quality_key
    side, sign = _sides(detector)
    if not fired:
        return f"tau_gen: {key} {verdict.value:.4g}, needs {side} {verdict.limit:.4g}"
    which = "the training images' level" if detector.floor_source == "train" or detector._auto else "floor"
    return (
        f"{key} = {verdict.value:.4g} {side} (1 {sign} {detector.eps:g}) x {which} {verdict.floor:.4g} "
        f"= {verdict.limit:.4g}"
    )


def _plateau_status(detector: TimescaleDetector, v: PlateauVerdict) -> str:
    """Where the plateau rule stands: the window's gain against the tolerance, the improvement so far."""
    noise_note = f", noise allowance {100 * v.tol:.1f}%" if v.tol > detector.rel_tol else ""
    if noise_note and v.allowance > v.tol:
        noise_note = f", noise allowance {100 * v.allowance:.1f}% capped at {100 * v.tol:g}%"
    return (
        f"plateau: {100 * v.gain:.1f}% gained over ({v.boundary:.6g}, {v.step}] (fires < {100 * detector.rel_tol:g}%"
        f"{noise_note}), {100 * v.total:.0f}% since the first (needs >= {100 * detector.min_improvement:g}%)"
    )


def _plateau_reason(detector: TimescaleDetector, v: PlateauVerdict) -> str:
    """The plateau rule's event reason, with the numbers that made it fire."""
    key, oriented = detector.quality_key, detector._oriented
    per = "of the distance to the training images' level " if v.above_floor else ""
    if v.tol > detector.rel_tol:
        sd = v.noise / (detector.noise_z * math.sqrt(2.0))
        against = f"the noise allowance {100 * v.tol:.2f}% ({detector.noise_z:g} x sqrt(2) x noise sd {sd:.3g}), "
        if v.allowance > v.tol:
            against = (
                f"the noise allowance capped at {100 * v.tol:.2f}% ({100 * v.allowance:.2f}% from "
                f"{detector.noise_z:g} x sqrt(2) x noise sd {sd:.3g}), "
            )
    else:
        against = f"rel_tol {100 * detector.rel_tol:g}%, "
    assert v.onset_value is not None
    return (
        f"{key}: best over steps ({v.boundary:.6g}, {v.step}] ({oriented(v.best_recent):.4g}) improves on the best "
        f"up to step {v.boundary:.6g} ({oriented(v.best_before):.4g}) by {100 * v.gain:.2f}% {per}< {against}"
        f"after a {100 * v.total:.1f}% improvement since the first evaluation "
        f"(>= min_improvement {100 * detector.min_improvement:g}%); the plateau began at step {v.onset_step} "
        f"({key} = {oriented(v.onset_value):.4g}), confirmed at step {v.step}"
    )


def detect_timescales(
    history: Sequence[Mapping[str, object]], **kwargs: Any
) -> tuple[TimescaleEvent | None, TimescaleEvent | None]:
    """Apply the detector's definitions to a complete history (offline).

    Args:
        history: evaluation records in increasing step order (e.g. ``MemWatch.history``).
        **kwargs: the :class:`TimescaleDetector` arguments (same defaults).

    Returns:
        ``(tau_gen, tau_mem)`` events, each None when its rule never fired. Equal to the flags of a
        detector fed the same records online.
    """
    detector = TimescaleDetector(**kwargs)
    for record in history:
        detector.update(record)
    return detector.tau_gen, detector.tau_mem

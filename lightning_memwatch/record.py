"""EvalRecord: the typed record of one evaluation, and the one mapping to and from logged scalar keys.

Every evaluation of :class:`~lightning_memwatch.MemWatch` (or of a plain
:class:`~lightning_memwatch.Evaluator` call) gives one :class:`EvalRecord`. The logger writes its scalars
through :meth:`EvalRecord.to_scalars`, the report reads TensorBoard back through
:meth:`EvalRecord.from_scalars`, and checkpoints hold :meth:`EvalRecord.to_dict` (plain Python values). The
logged keys (``memwatch/f_mem``, ...) are defined here once; :mod:`lightning_memwatch.log` re-exports them.

A record is also a read-only mapping, so code written for the dict records of earlier versions keeps working
(``record["f_mem"]``, ``record.get("fid")``, ``dict(record)``); new code reads attributes
(``record.f_mem``). A misspelt key fails loudly: ``record["f_mme"]`` raises a ``KeyError`` that lists the
keys, ``EvalRecord(f_mme=...)`` a ``TypeError``, and :meth:`~EvalRecord.from_dict` /
:meth:`~EvalRecord.from_scalars` a ``ValueError`` naming the unknown key.

Pure Python: no torch or Lightning import.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import KW_ONLY, dataclass, field, fields, replace
from typing import Any, ClassVar

__all__ = [
    "ClassRecord",
    "EvalRecord",
    "F_MEM",
    "F_MEM_CLASS_PREFIX",
    "F_MEM_CI_HIGH",
    "F_MEM_CI_LOW",
    "FID_KEY",
    "FID_NUM_SAMPLES",
    "FID_TRAIN_FLOOR",
    "NOT_RECORD_KEYS",
    "ONSET_FORECAST",
    "ONSET_FORECAST_HIGH",
    "ONSET_FORECAST_LOW",
    "PREFIX",
    "RATIO_MEDIAN",
    "RATIO_QUANTILES",
    "RECORD_FIELDS",
    "RecordField",
    "SCALAR_KEYS",
    "TAU_GEN",
    "TAU_MEM",
    "finite_float",
    "listed_keys",
]

PREFIX = "memwatch/"
"""Every key MemWatch logs starts with it; a user metric ``name`` is logged as ``memwatch/<name>``."""
F_MEM = "memwatch/f_mem"
F_MEM_CI_LOW = "memwatch/f_mem_ci_low"
F_MEM_CI_HIGH = "memwatch/f_mem_ci_high"
RATIO_MEDIAN = "memwatch/ratio_median"
FID_KEY = "memwatch/fid"
FID_NUM_SAMPLES = "memwatch/fid_num_samples"
ONSET_FORECAST = "memwatch/onset_forecast"
"""Forecast step (optimizer steps) at which f_mem leaves zero (:mod:`lightning_memwatch.onset`)."""
ONSET_FORECAST_LOW = "memwatch/onset_forecast_low"
ONSET_FORECAST_HIGH = "memwatch/onset_forecast_high"
TAU_GEN = "memwatch/tau_gen"
"""Logged once, at the evaluation that flags tau_gen: the event's step (optimizer steps)."""
TAU_MEM = "memwatch/tau_mem"
"""Logged once, at the evaluation that flags tau_mem: the event's step (optimizer steps)."""
F_MEM_CLASS_PREFIX = "memwatch/f_mem/class_"
"""Per generated class ``k`` of a class-conditional model, f_mem is logged as ``memwatch/f_mem/class_<k>``."""
FID_TRAIN_FLOOR = "memwatch/fid_train_floor"
"""Logged once at setup: FID of the training images against the reference (the level of real data)."""

NOT_RECORD_KEYS = frozenset({TAU_GEN, TAU_MEM, FID_TRAIN_FLOOR})
"""Scalars under :data:`PREFIX` that belong to the run, not to one evaluation (never read into a record)."""

class RecordField:
    """The names of the record's fields, for code that reads records as mappings (the detector and the
    stopper also take plain dict records): ``record[RecordField.F_MEM]``. A misspelt name is an
    ``AttributeError``, not a silent ``None``.

    One upper-case attribute per own field of :class:`EvalRecord` (``STEP``, ``F_MEM``, ``F_MEM_CI_LOW``, ...,
    ``SAMPLE_SECONDS``, ``PER_CLASS``), set from the dataclass's fields below: the names are spelled once, in the
    dataclass.
    """

    STEP: ClassVar[str]
    F_MEM: ClassVar[str]
    FID: ClassVar[str]
    NUM_SAMPLES: ClassVar[str]
    PER_CLASS: ClassVar[str]


# Field metadata (read below, so that every table of names derives from the dataclass):
#   "scalar": the key the field is logged under (user metrics and extra signals are logged as memwatch/<name>);
#   "quantile": the quantile of the per-sample ratios d1/d2 the field holds;
#   "fid": a FID field, listed as a mapping key even when None (FID off), as in the dict records.


@dataclass(frozen=True)
class ClassRecord:
    """f_mem of the samples generated for one class (class-conditional models), memorization judged against
    the whole training set as for the global f_mem.

    Attributes:
        num_samples: samples generated for the class (images).
        f_mem: fraction of them memorized, in [0, 1].
        f_mem_ci_low: lower end of its confidence interval (None when read back from a log).
        f_mem_ci_high: upper end (None when read back from a log).
    """

    num_samples: int | None
    f_mem: float
    f_mem_ci_low: float | None = None
    f_mem_ci_high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (inverse of :meth:`from_dict`)."""
        return {
            "num_samples": self.num_samples,
            "f_mem": self.f_mem,
            "f_mem_ci_low": self.f_mem_ci_low,
            "f_mem_ci_high": self.f_mem_ci_high,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ClassRecord) -> ClassRecord:
        """A class record from :meth:`to_dict`'s output (or the record itself)."""
        if isinstance(data, ClassRecord):
            return data
        return cls(**{key: data.get(key) for key in ("num_samples", "f_mem", "f_mem_ci_low", "f_mem_ci_high")})

    def get(self, key: str, default: Any = None) -> Any:
        """A field by name (as the detector reads records), or ``default``."""
        return getattr(self, key, default)


@dataclass(frozen=True, eq=False)
class EvalRecord(Mapping[str, Any]):
    """One evaluation: the memorization fraction of the samples, its interval, ratio quantiles, FID, metrics.

    Fields read back from a log that did not hold them (e.g. ``num_samples`` and the outer ratio quantiles,
    which are not logged as scalars) are None.

    Attributes:
        step: the trainer's ``global_step`` (optimizer steps) of the evaluation.
        f_mem: fraction of the generated samples with d1/d2 < threshold, in [0, 1].
        f_mem_ci_low: lower end of its bootstrap confidence interval.
        f_mem_ci_high: upper end of its bootstrap confidence interval.
        num_samples: generated samples f_mem was measured on (images).
        ratio_q05: 5% quantile of the per-sample nearest-neighbour ratios d1/d2.
        ratio_q25: 25% quantile of the ratios.
        ratio_median: median of the ratios.
        ratio_q75: 75% quantile of the ratios.
        ratio_q95: 95% quantile of the ratios.
        fid: FID of the generated samples against the reference, or None when FID is off.
        fid_num_samples: generated samples the FID was computed on (images), or None.
        metrics: user metrics ``{name: value}`` computed on the same samples (``MemWatch(metrics=...)``).
        sample_seconds: wall time of drawing the samples (seconds; global rank 0's under DDP).
        metric_seconds: wall time of the metrics on the samples (seconds).
        extra: further per-evaluation signals ``{name: value}`` (e.g. a probe reading at this step), logged
            as ``memwatch/<name>`` like the user metrics.
        scored_weights: which weights were scored (``"raw"``, ``"averaged"``, ``"module_ema"``, or
            ``"raw_warmup"``: the raw weights, because the chosen average had not been updated yet; see
            :mod:`lightning_memwatch.weights`), or None when not known (a plain Evaluator call).
        onset_forecast: forecast step (optimizer steps) at which f_mem leaves zero (reaches the level where
            the detector's tau_mem rule holds), from the drift of the low ratio quantiles
            (:mod:`lightning_memwatch.onset`); None when there is none (no drift yet, or f_mem already there).
        onset_forecast_low: early end of the forecast's interval (optimizer steps), or None.
        onset_forecast_high: late end of the forecast's interval (optimizer steps), or None (unbounded).
        per_class: class-conditional models: ``{class: ClassRecord}`` per generated class (sample count,
            f_mem and its interval), f_mem logged as ``memwatch/f_mem/class_<k>``; empty otherwise (and then not
            a mapping key).

    Example:
        >>> record = EvalRecord(step=500, f_mem=0.25, f_mem_ci_low=0.1, f_mem_ci_high=0.4, num_samples=4)
        >>> record.f_mem, record["f_mem"], record.get("fid")
        (0.25, 0.25, None)
        >>> sorted(record.to_scalars())
        ['memwatch/f_mem', 'memwatch/f_mem_ci_high', 'memwatch/f_mem_ci_low']
        >>> EvalRecord.from_scalars(500, record.to_scalars()).f_mem_ci_high
        0.4
    """

    # the order of the fields is the order of the mapping keys (that of the dict records of earlier versions)
    step: int
    _: KW_ONLY  # every field but the step by name
    num_samples: int | None = None
    f_mem: float = field(metadata={"scalar": F_MEM})
    f_mem_ci_low: float | None = field(default=None, metadata={"scalar": F_MEM_CI_LOW})
    f_mem_ci_high: float | None = field(default=None, metadata={"scalar": F_MEM_CI_HIGH})
    ratio_q05: float | None = field(default=None, metadata={"quantile": 0.05})
    ratio_q25: float | None = field(default=None, metadata={"quantile": 0.25})
    ratio_median: float | None = field(default=None, metadata={"quantile": 0.5, "scalar": RATIO_MEDIAN})
    ratio_q75: float | None = field(default=None, metadata={"quantile": 0.75})
    ratio_q95: float | None = field(default=None, metadata={"quantile": 0.95})
    fid: float | None = field(default=None, metadata={"fid": True, "scalar": FID_KEY})
    fid_num_samples: int | None = field(default=None, metadata={"fid": True, "scalar": FID_NUM_SAMPLES})
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, float] = field(default_factory=dict)
    metric_seconds: float | None = None
    sample_seconds: float | None = None
    scored_weights: str | None = None
    onset_forecast: float | None = field(default=None, metadata={"scalar": ONSET_FORECAST, "optional": True})
    onset_forecast_low: float | None = field(default=None, metadata={"scalar": ONSET_FORECAST_LOW, "optional": True})
    onset_forecast_high: float | None = field(default=None, metadata={"scalar": ONSET_FORECAST_HIGH, "optional": True})
    per_class: dict[int, ClassRecord] = field(default_factory=dict, metadata={"per_class": True})

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise ValueError(f"EvalRecord.step must be an int >= 0 (optimizer steps); got {self.step!r}.")
        object.__setattr__(self, "metrics", dict(self.metrics))
        object.__setattr__(self, "extra", dict(self.extra))
        per_class = {  # JSON turns the class keys into strings
            _as_int(int(k) if isinstance(k, str) and k.isdigit() else k, "per_class key"): ClassRecord.from_dict(v)
            for k, v in dict(self.per_class).items()
        }
        object.__setattr__(self, "per_class", dict(sorted(per_class.items())))
        clash = set(self.metrics) & set(self.extra)
        reserved = (set(self.metrics) | set(self.extra)) & set(_FIELD_NAMES)
        if clash or reserved:
            raise ValueError(
                f"EvalRecord: metric/extra names {sorted(clash | reserved)} clash with each other or with the "
                f"record's own fields ({', '.join(RECORD_FIELDS)}); rename them."
            )

    # -- the mapping view (compatibility with the dict records of earlier versions) ------------------------
    def _listed(self) -> list[str]:
        """Mapping keys in the order of the dict records: the fields holding a value (``fid`` and
        ``fid_num_samples`` always), the user metrics and extra signals by name before the timings."""
        keys: list[str] = []
        for name in _FIELD_NAMES:
            if name in _GROUPS:
                keys += list(getattr(self, name))
            elif name == RecordField.PER_CLASS:
                keys += [name] if self.per_class else []
            elif name in _ALWAYS_LISTED or getattr(self, name) is not None:
                keys.append(name)
        return keys

    def __getitem__(self, key: str) -> Any:
        if key in self.metrics:
            return self.metrics[key]
        if key in self.extra:
            return self.extra[key]
        if key in RECORD_FIELDS:
            value = getattr(self, key)
            if value is not None or key in _ALWAYS_LISTED:
                return value
        known = self._listed()
        close = difflib.get_close_matches(str(key), [*RECORD_FIELDS, *known], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"EvalRecord has no value for {key!r}.{hint} Its keys: {', '.join(known)}.")

    def __iter__(self) -> Iterator[str]:
        return iter(self._listed())

    def __len__(self) -> int:
        return len(self._listed())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._listed()

    def __eq__(self, other: object) -> bool:
        """Records compare by their fields; a record equals a plain mapping with the same items."""
        if isinstance(other, EvalRecord):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return dict(self.items()) == dict(other.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # holds dicts; equal records compare equal, never hashed

    # -- copies ----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> EvalRecord:
        """A copy with ``changes`` applied (e.g. ``record.replace(sample_seconds=1.5)``)."""
        return replace(self, **changes)

    # -- plain Python (checkpoints, JSON) ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values; ``metrics`` and ``extra`` as nested dicts. Inverse of
        :meth:`from_dict`; JSON- and ``torch.load(weights_only=True)``-safe."""
        out: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if name == RecordField.PER_CLASS:
                value = {k: c.to_dict() for k, c in value.items()}
            out[name] = dict(value) if name in _GROUPS else value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalRecord:
        """A record from :meth:`to_dict`'s output, or from a flat dict record of earlier versions (a
        ``MemWatch.history`` item of an old checkpoint: keys other than the fields are user metrics).

        Raises:
            ValueError: ``step`` or ``f_mem`` missing, or (for the nested form) an unknown key.
        """
        if isinstance(data, EvalRecord):
            return data
        if not isinstance(data, Mapping) or "step" not in data or "f_mem" not in data:
            raise ValueError(f"An EvalRecord needs at least 'step' and 'f_mem'; got {data!r}.")
        nested = all(isinstance(data.get(g), Mapping) for g in _GROUPS)
        values: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        for key, value in data.items():
            if key in _GROUPS and nested:
                continue
            if key in _FIELD_NAMES and key not in _GROUPS:
                values[key] = value
            elif nested:
                raise ValueError(
                    f"EvalRecord.from_dict: unknown key {key!r} (fields: {', '.join(_FIELD_NAMES)})."
                )
            else:  # a flat record of earlier versions: the user metrics sat beside the fields
                metrics[key] = value
        if nested:
            metrics, extra = dict(data["metrics"]), dict(data["extra"])
        else:
            extra = {}
        values["step"] = _as_int(values["step"], "step")
        return cls(**values, metrics=metrics, extra=extra)

    # -- logged scalars ------------------------------------------------------------------------------------
    def to_scalars(self) -> dict[str, float]:
        """The scalars MemWatch logs for this evaluation: ``{logged key: value}``.

        The fields of :data:`SCALAR_KEYS` that hold a value, then the user metrics and the extra signals as
        ``memwatch/<name>``. (The timescale events' :data:`TAU_GEN` / :data:`TAU_MEM` are the detector's, not
        the record's.)
        """
        out = {key: float(getattr(self, name)) for name, key in SCALAR_KEYS.items() if getattr(self, name) is not None}
        out.update({f"{PREFIX}{name}": float(value) for name, value in self.metrics.items()})
        out.update({f"{PREFIX}{name}": float(value) for name, value in self.extra.items()})
        out.update({f"{F_MEM_CLASS_PREFIX}{k}": float(c.f_mem) for k, c in self.per_class.items()})
        return out

    @classmethod
    def from_scalars(cls, step: int, scalars: Mapping[str, float]) -> EvalRecord:
        """The record of one evaluation rebuilt from the scalars logged at its step (inverse of
        :meth:`to_scalars` up to what the log cannot say: other ``memwatch/<name>`` scalars come back as
        ``metrics``, since the log does not tell user metrics from extra signals).

        Args:
            step: the step the scalars were logged at (optimizer steps).
            scalars: ``{logged key: value}``; run-level keys (:data:`NOT_RECORD_KEYS`, and the per-class onsets
                ``memwatch/tau_mem/class_<k>``) are ignored. Integer
                fields (``fid_num_samples``) are rounded back to ``int`` when finite.

        Raises:
            ValueError: a key outside ``memwatch/``, or no ``memwatch/f_mem`` among the scalars.
        """
        field_of = {key: name for name, key in SCALAR_KEYS.items()}
        values: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        per_class: dict[int, ClassRecord] = {}
        for key, value in scalars.items():
            if isinstance(key, str) and key.startswith(F_MEM_CLASS_PREFIX) and key[len(F_MEM_CLASS_PREFIX):].isdigit():
                per_class[int(key[len(F_MEM_CLASS_PREFIX):])] = ClassRecord(num_samples=None, f_mem=float(value))
                continue
            if not isinstance(key, str) or not key.startswith(PREFIX):
                raise ValueError(
                    f"EvalRecord.from_scalars: {key!r} is not a MemWatch key (they start with {PREFIX!r})."
                )
            if key in NOT_RECORD_KEYS or key.startswith(f"{TAU_MEM}/class_"):  # run-level, per-class onsets too
                continue
            name = field_of.get(key)
            if name is None:
                metrics[key[len(PREFIX):]] = float(value)
                continue
            number = float(value)
            values[name] = int(round(number)) if name in _INT_FIELDS and math.isfinite(number) else number
        if "f_mem" not in values:
            raise ValueError(f"EvalRecord.from_scalars: no {F_MEM!r} among the scalars of step {step}.")
        return cls(step=_as_int(step, "step"), **values, metrics=metrics, per_class=per_class)


def finite_float(value: object) -> float | None:
    """``value`` as a finite float, or None when it is missing, None, non-numeric, NaN or infinite: how the
    detector and the stopper read a record's values (e.g. ``finite_float(record.get("fid"))``)."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"EvalRecord.{name} must be an integer; got {value!r}.")
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"EvalRecord.{name} must be an integer; got {value!r}.") from None
    if out != value:
        raise ValueError(f"EvalRecord.{name} must be an integer; got {value!r}.")
    return out


# -- every table of names, from the dataclass's fields -------------------------------------------------------
_FIELDS = tuple(f for f in fields(EvalRecord) if f.name != "_")
_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in _FIELDS)
# their entries are keys by name (per_class is one key, listed when it holds a class)
_GROUPS = tuple(f.name for f in _FIELDS if str(f.type).startswith("dict") and not f.metadata.get("per_class"))
_ALWAYS_LISTED = tuple(f.name for f in _FIELDS if f.metadata.get("fid"))
_INT_FIELDS = frozenset(f.name for f in _FIELDS if str(f.type).startswith("int"))
RECORD_FIELDS: tuple[str, ...] = tuple(name for name in _FIELD_NAMES if name not in _GROUPS)
"""Names of the record's own fields (mapping keys besides the user metrics and extra signals)."""
SCALAR_KEYS: dict[str, str] = {f.name: f.metadata["scalar"] for f in _FIELDS if "scalar" in f.metadata}
"""Record field -> logged scalar key (the fields logged under their own constant; user metrics and extra
signals are logged as ``memwatch/<name>``)."""
RATIO_QUANTILES: dict[str, float] = {f.name: f.metadata["quantile"] for f in _FIELDS if "quantile" in f.metadata}
"""Record field -> quantile of the per-sample nearest-neighbour ratios d1/d2 stored in every record."""
for _name in RECORD_FIELDS:
    setattr(RecordField, _name.upper(), _name)


def listed_keys(*, fid: bool, metrics: Iterable[str] = (), extra: Iterable[str] = ()) -> list[str]:
    """The mapping keys of a record whose every own field holds a value, in order: the FID fields only when
    ``fid``, the user metrics and extra signals by name (e.g. what every MemWatch record holds); never the
    fields that hold a value only at some evaluations (the onset forecast's)."""
    keys: list[str] = []
    for f in _FIELDS:
        if f.name in _GROUPS:
            keys += list(metrics if f.name == "metrics" else extra)
        elif f.metadata.get("per_class"):
            continue  # class-conditional records only
        elif (fid or not f.metadata.get("fid")) and not f.metadata.get("optional"):
            keys.append(f.name)
    return keys

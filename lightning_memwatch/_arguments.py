"""The torch-free part of the one error policy (:mod:`lightning_memwatch._checks`): the error classes and the
argument checks of plain numbers and choices.

Pure Python at import (no torch, numpy or Lightning), so that the Lightning-free and torch-free modules
(:mod:`lightning_memwatch.detection`, the timescale rules) raise the same :class:`ConfigError` as the rest of the
package. :mod:`lightning_memwatch._checks` re-exports every name here; import from there unless the importing
module must stay free of torch. Lightning is loaded only when an error is raised (its
``MisconfigurationException`` is a base class of :class:`ConfigError`).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    class ConfigError(ValueError, MisconfigurationException):
        """A bad argument or input value."""

    class ConfigTypeError(TypeError, MisconfigurationException):
        """A bad argument or input type."""


__all__ = ["check_choice", "check_float", "check_int", "config_error", "config_type_error"]

_T = TypeVar("_T")


@functools.cache
def _error_classes() -> tuple[type[ValueError], type[TypeError]]:
    """``(ConfigError, ConfigTypeError)``, created once, on first use (imports Lightning's exception)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    class ConfigError(ValueError, MisconfigurationException):
        """A bad argument or input value: a ``ValueError`` and a Lightning ``MisconfigurationException``."""

    class ConfigTypeError(TypeError, MisconfigurationException):
        """A bad argument or input type: a ``TypeError`` and a Lightning ``MisconfigurationException``."""

    for cls in (ConfigError, ConfigTypeError):
        # picklable as lightning_memwatch._checks.X, the public home of the policy (its __getattr__ serves them)
        cls.__module__, cls.__qualname__ = "lightning_memwatch._checks", cls.__name__
    return ConfigError, ConfigTypeError


def __getattr__(name: str) -> type[Exception]:
    if name == "ConfigError":
        return _error_classes()[0]
    if name == "ConfigTypeError":
        return _error_classes()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_error(message: str) -> ValueError:
    """A :class:`ConfigError` (``ValueError`` + ``MisconfigurationException``) to raise: ``raise config_error(...)``."""
    return _error_classes()[0](message)


def config_type_error(message: str) -> TypeError:
    """A :class:`ConfigTypeError` (``TypeError`` + ``MisconfigurationException``) to raise."""
    return _error_classes()[1](message)


# ------------------------------------------------------------------------------------ argument validation
# Numbers from configs and arrays arrive as Python, numpy or torch scalars: all are accepted when they hold the
# right kind of value. A wrong type and a value out of range get different messages.


def _scalar(value: object) -> object:
    """A Python number from a numpy/torch scalar or one-element 0-d array/tensor; anything else as given.
    (Read by duck typing, ``ndim == 0`` and ``item()``, so that this module imports neither numpy nor torch.)"""
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()  # type: ignore[attr-defined]
    return value


def check_int(value: object, name: str, *, minimum: int | None = None, unit: str = "") -> int:
    """``value`` as a Python int: an int, a numpy/torch integer, or an integral float (``4.0``); at least
    ``minimum``. Bools and non-integral numbers (``4.5``, never truncated) are refused.

    Args:
        value: the argument received.
        name: its name, for the message.
        minimum: smallest allowed value, or None.
        unit: what it counts (e.g. ``"optimizer steps"``), for the message.
    """
    raw = _scalar(value)
    what = "a positive int" if minimum == 1 else f"an int{f' >= {minimum}' if minimum is not None else ''}"
    what += f" ({unit})" if unit else ""
    if isinstance(raw, bool) or not isinstance(raw, (numbers.Integral, numbers.Real)):
        raise config_type_error(f"{name} must be {what}; got {type(value).__name__} {value!r}.")
    if not isinstance(raw, numbers.Integral):
        if not math.isfinite(raw) or raw != int(raw):
            raise config_error(f"{name} must be {what}; got the non-integral number {value!r}, not truncated.")
    out = int(raw)
    if minimum is not None and out < minimum:
        raise config_error(f"{name} must be {what}; got {out}.")
    return out


def check_float(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> float:
    """``value`` as a finite Python float (a Python, numpy or torch real; not a bool) within ``[low, high]``
    (open ends where ``low_open`` / ``high_open``). ``hint`` is appended to the range message."""
    raw = _scalar(value)
    lo_b, hi_b = ("(" if low_open else "["), (")" if high_open else "]")
    lo_b, hi_b = ("(" if low is None else lo_b), (")" if high is None else hi_b)  # infinities are refused
    interval = f"{lo_b}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi_b}"
    what = f"a number in {interval}" if low is not None or high is not None else "a finite number"
    what += f" ({hint})" if hint else ""
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
        raise config_type_error(f"{name} must be {what}; got {type(value).__name__} {value!r}.")
    out = float(raw)
    below = low is not None and (out <= low if low_open else out < low)
    above = high is not None and (out >= high if high_open else out > high)
    if not math.isfinite(out) or below or above:
        raise config_error(f"{name} must be {what}; got {out}.")
    return out


def check_choice(value: _T, name: str, allowed: Sequence[object], *, hint: str = "") -> _T:
    """``value`` when it equals one of ``allowed`` (a bool only matches a bool); else a :class:`ConfigError`
    that lists the allowed values and the value received, followed by ``hint``."""
    if not _is_one_of(value, allowed):
        choices = ", ".join(repr(a) for a in allowed)
        raise config_error(f"{name} must be one of {choices}; got {value!r}.{f' {hint}' if hint else ''}")
    return value


def _is_one_of(value: object, allowed: Sequence[object]) -> bool:
    if isinstance(value, bool):
        return any(a is value for a in allowed)
    try:
        return any(not isinstance(a, bool) and bool(value == a) for a in allowed)
    except (TypeError, ValueError, RuntimeError):  # e.g. a tensor of several values
        return False

"""Deprecations that name the release removing them (in the manner of diffusers' ``deprecate()``).

Every compatibility shim (an old import path in :mod:`lightning_memwatch._moved`) and every deprecated argument
warns through :func:`deprecate`, which says what to use instead and the release that removes the old form.
Once the package reaches that release, :func:`deprecate` raises for the maintainers instead: the shim is due
for removal. Pure Python: no torch or Lightning import.
"""

from __future__ import annotations

import warnings

__all__ = ["REMOVAL_RELEASE", "deprecate"]

REMOVAL_RELEASE = "0.3.0"
"""The release that removes the shims and arguments deprecated in the 0.1 and 0.2 series."""


def _release(version: str) -> tuple[int, ...]:
    """``"0.3.0"`` -> ``(0, 3, 0)`` (the numeric prefix of each part; ``"0.3.0rc1"`` -> ``(0, 3, 0)``)."""
    parts = []
    for part in version.split("."):
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        parts.append(int(digits or 0))
    return tuple(parts)


def deprecate(message: str, removed_in: str = REMOVAL_RELEASE, *, stacklevel: int = 2) -> None:
    """Warn with a :class:`DeprecationWarning` whose ``message`` names the removal release ``removed_in``.

    Raises:
        RuntimeError: the package's own version has reached ``removed_in``: remove the deprecated form.
    """
    from lightning_memwatch import __version__

    if _release(__version__) >= _release(removed_in):
        raise RuntimeError(
            f"lightning-memwatch {__version__} still carries a form deprecated for removal in {removed_in}: "
            f"remove it ({message})"
        )
    if removed_in not in message:
        message = f"{message} (removed in lightning-memwatch {removed_in})"
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)

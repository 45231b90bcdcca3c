"""Applications built on the lightning_memwatch core: the ``memwatch`` command, its demo and sweep report, and the
paper's models and data modules.

They need the ``[apps]`` install extra (``pip install 'lightning-memwatch[apps]'``: scikit-learn for the digits,
matplotlib for the report's plots, jsonargparse for ``memwatch fit`` / ``sweep``). A training script needs only
the core (``lightning_memwatch``, its callbacks, metrics and detection), which never imports this package.

Modules: :mod:`~lightning_memwatch.apps.cli` (the ``memwatch`` command), :mod:`~lightning_memwatch.apps.demo`,
:mod:`~lightning_memwatch.apps.report`, :mod:`lightning_memwatch.apps.models` (DDPM, U-Net, residual MLP) and
:mod:`lightning_memwatch.apps.data` (digits, CelebA, Gaussian-mixture data modules).
"""

from __future__ import annotations

import importlib.util

__all__ = ["APPS_INSTALL", "missing_requirements"]

APPS_INSTALL = "pip install 'lightning-memwatch[apps]'"
"""The command that installs what the applications need beyond the core."""

# import name -> distribution name, for what the [apps] extra adds to the core's dependencies (pyproject.toml);
# docstring_parser and typeshed_client are jsonargparse's [signatures] extra, which LightningCLI requires.
_REQUIREMENTS = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "jsonargparse": "jsonargparse",
    "docstring_parser": "docstring-parser",
    "typeshed_client": "typeshed-client",
}


def missing_requirements() -> list[str]:
    """Distribution names of the ``[apps]`` extra's packages that this environment cannot import (empty: none)."""
    return [dist for module, dist in _REQUIREMENTS.items() if importlib.util.find_spec(module) is None]

"""Old import paths of modules that moved: the applications to :mod:`lightning_memwatch.apps`, the probe to
:mod:`lightning_memwatch.callbacks.probe`.

``lightning_memwatch.demo``, ``.cli``, ``.report``, ``.models`` and ``.data`` (and their submodules, e.g.
``lightning_memwatch.models.unet``) and ``lightning_memwatch.probe`` still import, with a
:class:`DeprecationWarning` naming the release that removes the old path (:data:`REMOVED_IN`), as the very module
objects of their new homes (``lightning_memwatch.models.DDPM is lightning_memwatch.apps.models.DDPM``), so old
scripts, recipe ``class_path`` values and pickles keep working; ``python -m lightning_memwatch.cli`` runs too.
One import hook (a :data:`sys.meta_path` finder, installed by ``lightning_memwatch/__init__.py``) serves them
all, instead of one shim file per module. This is the only core module that names ``lightning_memwatch.apps``,
and only as text: it imports an application module only when someone imports its old name.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import CodeType, ModuleType

from lightning_memwatch._deprecation import REMOVAL_RELEASE, deprecate

MOVED: dict[str, str] = {
    "cli": "apps.cli",
    "data": "apps.data",
    "demo": "apps.demo",
    "models": "apps.models",
    "report": "apps.report",
    "probe": "callbacks.probe",
}
"""Former top-level modules and packages of ``lightning_memwatch`` -> their new names under it."""
REMOVED_IN = REMOVAL_RELEASE
"""The release that removes the old paths."""

_PREFIX = "lightning_memwatch."


def new_name(old: str) -> str | None:
    """The new name of an old name ``lightning_memwatch.X...`` of a moved module, else None."""
    if not old.startswith(_PREFIX):
        return None
    head, dot, tail = old[len(_PREFIX) :].partition(".")
    if head not in MOVED:
        return None
    return _PREFIX + MOVED[head] + dot + tail


def _warn(old: str, new: str) -> None:
    deprecate(
        f"{old} moved to {new}; import it from there (the old path will be removed in lightning-memwatch "
        f"{REMOVED_IN}).",
        REMOVED_IN,
        stacklevel=3,
    )


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new name (the same object, imported once)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        new = new_name(fullname)
        found = None if new is None else importlib.util.find_spec(new)
        if found is None:
            return None  # not a moved name, or no such module at the new home either: the usual import error
        return ModuleSpec(fullname, self, origin=found.origin, is_package=found.submodule_search_locations is not None)

    def create_module(self, spec: ModuleSpec) -> ModuleType:
        new = new_name(spec.name)
        assert new is not None
        _warn(spec.name, new)
        module = importlib.import_module(new)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Nothing to run (the module was executed under its new name), but the import system has just stamped
        # the old name's spec on it: give the module its own spec back.
        module.__spec__ = module.__spec__.loader_state

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, for ``python -m lightning_memwatch.<old name>`` (runpy asks the loader)."""
        new = new_name(fullname)
        assert new is not None
        _warn(fullname, new)
        spec = importlib.util.find_spec(new)
        assert spec is not None and isinstance(spec.loader, importlib.abc.InspectLoader)
        return spec.loader.get_code(new)


def install() -> None:
    """Put the finder first on :data:`sys.meta_path` (once): an old submodule name must never reach the path
    finder, which would load a second copy of the module from the new package's folder."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())

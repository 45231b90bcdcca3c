"""The environment of a test's child Python process."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_RANK_VARIABLES = ("MASTER_", "PL_", "LOCAL_RANK", "NODE_RANK")


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment without the rank variables an in-process DDP fit may have left (a child would
    inherit them and try to join that group), with the repository first on PYTHONPATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_RANK_VARIABLES)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env

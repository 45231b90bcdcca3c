"""Suite-wide test policy: every test starts from the same RNG state, whatever ran before it.

CI runs the suite in random order (pytest-randomly prints its seed on the first line; rerun an order with
``-p randomly --randomly-seed=N``). pytest-randomly reseeds ``random`` and numpy before each test, not torch: the
fixture below resets torch's global generator too, so a model a test builds without its own seed gets the same
weights in any order. Tests still seed what they build themselves; this is the safety net.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

SUITE_SEED = 0


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    random.seed(SUITE_SEED)
    np.random.seed(SUITE_SEED)
    torch.manual_seed(SUITE_SEED)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the order's seed even under ``-q`` (pytest-randomly prints it only in the header)."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and getattr(config.option, "randomly_reorganize", True):
        terminalreporter.write_line(f"random test order: rerun it with -p randomly --randomly-seed={seed}")
    else:
        terminalreporter.write_line("fixed test order (pytest-randomly not active)")

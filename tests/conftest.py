"""Suite-wide test policy: every test starts from the same RNG state, whatever ran before it.

CI runs the suite in random order, spread over the cores by pytest-xdist a file at a time (``-n auto --dist
loadfile``: a file's tests and its module fixtures stay in one worker); the last line prints the seed and the
options that rerun the same order. pytest-randomly reseeds ``random`` and numpy before each test, not torch: the
fixture below resets torch's global generator too, so a model a test builds without its own seed gets the same
weights in any order. Tests still seed what they build themselves; this is the safety net.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

SUITE_SEED = 0


@pytest.fixture(autouse=True)
def _seed_every_test() -> None:
    random.seed(SUITE_SEED)
    np.random.seed(SUITE_SEED)
    torch.manual_seed(SUITE_SEED)


@pytest.fixture(autouse=True)
def _no_leaked_process_state() -> Iterator[None]:
    """Undo what an in-process fit leaves behind for the tests after it.

    A fit with a DDP strategy in this process (even ``devices=1``) sets ``MASTER_PORT`` & co. in
    ``os.environ`` and keeps a process group whose store listens on that port: a later test's DDP subprocess
    would inherit the variable and fail with EADDRINUSE. Environment, process group and thread count are
    restored after every test.
    """
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the order's seed even under ``-q`` (pytest-randomly prints it only in the header)."""
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.hasplugin("randomly") and getattr(config.option, "randomly_reorganize", True):
        workers = getattr(config.option, "numprocesses", None)  # pytest-xdist's -n: each worker's share is reordered
        spread = f" -n {workers} --dist {config.option.dist}" if workers else ""
        terminalreporter.write_line(f"random test order: rerun it with -p randomly --randomly-seed={seed}{spread}")
    else:
        terminalreporter.write_line("fixed test order (pytest-randomly not active)")

"""The light modules of the core import only what they need, read off one fresh process (tests/_import_stages.py).

Each test below asserts on one stage of that process; the process runs once per test session (module fixture),
because every interpreter start with torch costs seconds of the CI budget.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from _child_env import child_env

SCRIPT = Path(__file__).with_name("_import_stages.py")
ROOT = SCRIPT.parents[1]
WALL = 300  # seconds: far above the ~10 s the process takes


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("import_stages") / "stages.json"
    env = child_env()
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=WALL, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def _stage(stages: dict, name: str) -> dict:
    stage = stages[name]
    assert stage["error"] is None, stage["error"]
    return stage


def _lightning(loaded: list[str]) -> list[str]:
    return [m for m in loaded if m in ("lightning", "pytorch_lightning")]


def test_record_module_imports_no_torch_numpy_or_lightning(stages):
    loaded = _stage(stages, "record")["loaded"]
    assert "lightning_memwatch.record" in loaded
    assert [m for m in loaded if not m.startswith("lightning_memwatch.")] == []


def test_the_timescale_rules_and_their_argument_checks_import_no_torch_numpy_or_lightning(stages):
    stage = _stage(stages, "detection")
    assert stage["value"] == [2, 1]  # it ran: a detector was built (its arguments checked) and fed a record
    assert "lightning_memwatch._arguments" in stage["loaded"]
    assert [m for m in stage["loaded"] if not m.startswith("lightning_memwatch.")] == []


def test_checks_import_no_lightning_until_an_error_is_raised(stages):
    assert _lightning(_stage(stages, "checks")["loaded"]) == []
    raised = _stage(stages, "checks_error")["value"]
    assert raised == {"lightning_before": False, "misconfiguration": True}


def test_frechet_module_imports_neither_lightning_nor_the_fid_module(stages):
    stage = _stage(stages, "frechet")
    assert stage["value"] < 1e-9  # it ran: the distance of a distribution to itself
    assert _lightning(stage["loaded"]) == []
    for module in ("metrics.fid", "metrics.features", "evaluator"):
        assert f"lightning_memwatch.{module}" not in stage["loaded"]


def test_images_module_imports_no_lightning(stages):
    stage = _stage(stages, "images")
    assert stage["value"] == 3
    assert _lightning(stage["loaded"]) == []


def test_the_evaluator_imports_and_runs_without_lightning(stages):
    stage = _stage(stages, "evaluator")
    assert stage["value"] == [3, 1.0]  # four exact copies of training images: all memorized
    assert _lightning(stage["loaded"]) == []


def test_plain_import_imports_no_optional_sampler_package(stages):
    loaded = _stage(stages, "adapters")["loaded"]
    assert "lightning_memwatch.callbacks.memwatch" in loaded and "lightning_memwatch.adapters" in loaded
    assert [m for m in loaded if m in ("diffusers", "denoising_diffusion_pytorch")] == []

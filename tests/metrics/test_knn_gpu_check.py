"""benchmarks/gpu_check.sh --dry-run: the GPU check's steps at smoke sizes on CUDA-less torch, so it cannot rot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # four Python processes (about 30 CPU seconds)
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_dry_run_runs_every_step_and_writes_its_outputs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "env.txt",
        "knn_property_tests.txt",
        "knn_saturated.txt",
        "knn_uniform.txt",
    ]
    assert "faiss" in (tmp_path / "env.txt").read_text()
    for name in ("knn_uniform.txt", "knn_saturated.txt"):
        text = (tmp_path / name).read_text()
        assert "| torch | " in text and "| torch-bf16 | " in text and "40/40 |" in text  # exact vs float64
    assert "FAILED" not in done.stdout

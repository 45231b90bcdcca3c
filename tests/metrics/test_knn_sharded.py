"""ShardedNearestNeighbourIndex with 2 and 4 gloo processes equals one process's NearestNeighbourIndex."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_memwatch.metrics.knn import available_backends
from lightning_memwatch.metrics.knn_sharded import ShardedNearestNeighbourIndex

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_single_process(tmp_path: Path, world: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    script = Path(__file__).with_name("_knn_sharded_worker.py")
    done = subprocess.run(
        [sys.executable, str(script), str(world), str(tmp_path)], env=env, timeout=240, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    backends = len([b for b in available_backends("cpu") if b != "faiss-gpu"])  # what the worker runs
    for rank in range(world):
        assert (tmp_path / f"rank{rank}.ok").read_text() == str(3 * backends + 3)


def test_needs_a_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedNearestNeighbourIndex(torch.randn(4, 3))

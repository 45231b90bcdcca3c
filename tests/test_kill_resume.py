"""A fit killed with SIGKILL mid-run and resumed from its last checkpoint reproduces, bit for bit, the
uninterrupted fit: MemWatch's history, the tau_gen / tau_mem flags, the stopper's state and every weight.

Each fit runs in its own process (tests/_kill_resume_fit.py), so the kill is real: no teardown, no exception
hook. Bit-exact equality holds by construction: both runs execute the same kernels on the same batches (an
epoch-seeded shuffle; resumes start at an epoch boundary), one CPU thread, and MemWatch seeds every sample.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _child_env import child_env

SCRIPT = Path(__file__).with_name("_kill_resume_fit.py")
ROOT = Path(__file__).resolve().parents[1]
HANG_AT = 33  # optimizer steps: after the checkpoint of step 30 (and the best weights of step 25), before 35
WALL = 240  # seconds per fit, far above the ~10 s one takes on an idle 2-core machine


def _env() -> dict[str, str]:
    return child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _fit(out: Path, *args: str) -> dict:
    subprocess.run([sys.executable, str(SCRIPT), str(out), *args], check=True, env=_env(), timeout=WALL, cwd=out.parent)
    return json.loads((out / "result.json").read_text())


def _fit_and_kill(out: Path) -> None:
    out.mkdir(parents=True)
    log = (out / "stderr.txt").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(out), "--hang-at", str(HANG_AT)], env=_env(), cwd=out.parent, stderr=log
    )
    try:
        deadline = time.monotonic() + WALL
        while not (out / "hanging").exists():
            if proc.poll() is not None:
                raise AssertionError(
                    f"the fit exited ({proc.returncode}) before step {HANG_AT}:\n"
                    f"{(out / 'stderr.txt').read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"the fit did not reach step {HANG_AT} within {WALL} s")
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        log.close()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_for_bit_the_uninterrupted_fit(tmp_path):
    full = _fit(tmp_path / "full")

    killed = tmp_path / "killed"
    _fit_and_kill(killed)
    assert not (killed / "result.json").exists()  # it really died mid-run
    checkpoints = {int(p.stem.split("step=")[1]): p for p in (killed / "ckpt").glob("*.ckpt")}
    assert sorted(checkpoints) == [6, 12, 18, 24, 30]
    assert sorted(int(p.stem.split("_")[1]) for p in killed.glob("weights_*.pt")) == [5, 10, 15, 20, 25, 30]
    resumed = _fit(killed, "--resume", str(checkpoints[30]))

    # the uninterrupted run flags tau_gen at 15, stops at tau_mem = 40 and ends with the weights of step 25
    assert full["tau_gen"] == 15 and full["tau_mem"] == 40 and full["stopped_step"] == 40
    assert full["best_step"] == 25 and full["restored_step"] == 25
    assert [r["step"] for r in full["history"]] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert full["copies"]["rows"]  # the samples of step 40 copied training images
    assert resumed == full  # history (every logged value), flags, stopper state, copy table: exactly equal

    load = lambda path: torch.load(path, map_location="cpu", weights_only=True)  # noqa: E731
    for step in (35, 40):  # trained after the resume
        assert _same(load(killed / f"weights_{step}.pt"), load(tmp_path / "full" / f"weights_{step}.pt")), step
    assert _same(load(killed / "final.pt"), load(tmp_path / "full" / "final.pt"))
    assert _same(load(killed / "final.pt"), load(tmp_path / "full" / "weights_25.pt"))  # the restored best
    assert not _same(load(tmp_path / "full" / "weights_25.pt"), load(tmp_path / "full" / "weights_40.pt"))

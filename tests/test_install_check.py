"""FAISS packaging: the CPU and GPU wheels both install the `faiss` package, so no install may bring both."""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest

from lightning_memwatch import install_check

ROOT = Path(__file__).resolve().parents[1]


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _faiss(requirements: list[str]) -> set[str]:
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}
    return names & set(install_check.FAISS_DISTRIBUTIONS)


def test_no_install_brings_two_faiss_builds():
    project = _project()
    base, extras = _faiss(project["dependencies"]), project["optional-dependencies"]
    assert base == set()  # was faiss-cpu: then `[gpu]` installed faiss-gpu-cu12 beside it
    assert _faiss(extras["cpu"]) == {"faiss-cpu"} and _faiss(extras["gpu"]) == {"faiss-gpu-cu12"}
    for name, requirements in extras.items():
        assert len(base | _faiss(requirements)) <= 1, name


def _pretend_installed(monkeypatch, installed: dict[str, str]) -> None:
    def version(name: str) -> str:
        if name in installed:
            return installed[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(install_check.metadata, "version", version)


def test_side_by_side_builds_are_reported_with_the_fix(monkeypatch, capsys):
    _pretend_installed(monkeypatch, {"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1.post1"})
    assert install_check.faiss_distributions() == {"faiss-cpu": "1.15.1", "faiss-gpu-cu12": "1.14.1.post1"}
    assert install_check.main([]) == 1
    out = capsys.readouterr().out
    assert "2 FAISS distributions install the same `faiss` package" in out
    assert "pip uninstall -y faiss-cpu faiss-gpu-cu12 && pip install 'lightning-memwatch[gpu]'" in out


def test_one_build_is_ok_and_gpu_is_checked_on_request(monkeypatch, capsys):
    _pretend_installed(monkeypatch, {"faiss-cpu": "1.15.1"})
    monkeypatch.setattr("lightning_memwatch.metrics.knn._faiss_num_gpus", lambda faiss: 0)
    assert install_check.main([]) == 0
    assert capsys.readouterr().out.rstrip().endswith("OK")
    assert install_check.main(["--gpu"]) == 1
    assert "FAISS sees no GPU" in capsys.readouterr().out
    _pretend_installed(monkeypatch, {})
    ok, lines = install_check.check_install()
    assert ok and "none (the torch backend is used)" in lines[0]

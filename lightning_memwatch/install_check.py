"""Which FAISS build is installed, and which nearest-neighbour backends MemWatch can use here.

``faiss-cpu`` and the GPU wheel (``faiss-gpu-cu12``, the ``gpu`` extra) both install the Python package
``faiss``: installed side by side, the one pip wrote last owns the shared files, so a GPU machine may silently
run the CPU build, and uninstalling either breaks the other. Run::

    python -m lightning_memwatch.install_check          # exit status 1 on a mixed install
    python -m lightning_memwatch.install_check --gpu    # also 1 unless FAISS sees a CUDA GPU

and follow the printed fix.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

__all__ = ["FAISS_DISTRIBUTIONS", "faiss_distributions", "check_install", "main"]

#: PyPI distributions that install the ``faiss`` package (CPU build first).
FAISS_DISTRIBUTIONS: tuple[str, ...] = (
    "faiss-cpu",
    "faiss-gpu-cu12",
    "faiss-gpu-cu11",
    "faiss-gpu",
    "faiss-gpu-cuvs",
    "faiss-gpu-cu12-cuvs",
    "faiss-cuda",
)
GPU_FIX = "pip uninstall -y {names} && pip install 'lightning-memwatch[gpu]'"
CPU_FIX = "pip uninstall -y {names} && pip install 'lightning-memwatch[cpu]'"


def faiss_distributions() -> dict[str, str]:
    """``{distribution name: version}`` of every installed distribution that ships the ``faiss`` package."""
    found = {}
    for name in FAISS_DISTRIBUTIONS:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def check_install(*, want_gpu: bool = False) -> tuple[bool, list[str]]:
    """Inspect the FAISS install; return ``(ok, report lines)``.

    Args:
        want_gpu: also require that FAISS sees at least one CUDA GPU.

    Returns:
        ``ok`` is False for two FAISS distributions side by side, or (``want_gpu``) no FAISS GPU.
    """
    import torch

    from lightning_memwatch.metrics.knn import _faiss_num_gpus, _import_faiss, available_backends

    dists = faiss_distributions()
    names = " ".join(dists) or "faiss-cpu"
    faiss = _import_faiss()
    gpus = _faiss_num_gpus(faiss)
    lines = [
        "FAISS distributions: "
        + (", ".join(f"{k}=={v}" for k, v in dists.items()) or "none (the torch backend is used)"),
        f"faiss imports: {faiss is not None}; GPUs FAISS sees: {gpus}; torch.cuda.is_available(): "
        f"{torch.cuda.is_available()}",
        f"backends for data on cpu: {available_backends('cpu')}",
    ]
    if torch.cuda.is_available():
        lines.append(f"backends for data on cuda: {available_backends('cuda')}")
    ok = True
    if len(dists) > 1:
        ok = False
        lines.append(
            f"PROBLEM: {len(dists)} FAISS distributions install the same `faiss` package, the last one written wins. "
            f"Keep one: for GPUs `{GPU_FIX.format(names=names)}`; for the CPU `{CPU_FIX.format(names=names)}`."
        )
    if want_gpu and gpus == 0:
        ok = False
        lines.append(
            "PROBLEM: FAISS sees no GPU. "
            + (
                "No CUDA device is visible to torch either: check the driver / CUDA_VISIBLE_DEVICES."
                if not torch.cuda.is_available()
                else f"The active faiss is a CPU build: `{GPU_FIX.format(names=names)}`."
            )
            + " MemWatch still works: knn_backend='auto' uses the exact 'torch' backend on the module's device."
        )
    if ok:
        lines.append("OK")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    """Print the install report; exit status 0 when it is consistent (see :func:`check_install`)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_memwatch.install_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--gpu", action="store_true", help="also require FAISS GPU support")
    args = parser.parse_args(argv)
    ok, lines = check_install(want_gpu=args.gpu)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

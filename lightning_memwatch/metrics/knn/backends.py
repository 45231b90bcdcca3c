"""Which backend runs a search: the documented ``"auto"`` rule, what is installed, matmul precision settings."""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch

from lightning_memwatch._checks import config_error

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "faiss_num_gpus",
    "has_fast_bfloat16",
    "import_faiss",
    "matmul_input_unit",
    "resolve_backend",
]

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch", "torch-bf16"]
BACKENDS: tuple[str, ...] = ("auto", "faiss-gpu", "faiss-cpu", "torch", "torch-bf16")
# Auto uses the bf16 screen up to this dimension: its bound grows with the 3 D-long sum (see knn.bounds).
SCREEN_MAX_AUTO_DIM = 4096


def import_faiss() -> Any | None:
    """The faiss module, or None when it is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_num_gpus(faiss: Any | None) -> int:
    """GPUs faiss can use (0 without faiss or without a GPU build)."""
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # pragma: no cover - broken GPU driver set-ups
        return 0


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:  # pragma: no cover - not Linux
        pass
    return frozenset()


def cuda_bf16_screen_ok(device: torch.device) -> bool:
    """Whether cuBLAS' bfloat16 GEMMs on ``device`` meet the screen's assumptions (see :mod:`.bounds`).

    Tensor-core bfloat16 GEMMs with float32 accumulation exist from compute capability 8.0 (Ampere); torch
    exposes the float32 output (``torch.mm(..., out_dtype=torch.float32)``) from 2.9. Older devices or torch:
    the float32 path.
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8 and torch.cuda.is_bf16_supported()


def has_fast_bfloat16(device: torch.device | str = "cpu") -> bool:
    """Whether ``backend="auto"`` screens with bfloat16 GEMMs for data on ``device``.

    The rule: a CPU that reports ``amx_bf16`` (Intel Sapphire Rapids and later), where torch's bfloat16 GEMM runs
    several times faster than its float32 GEMM, or a CUDA device of compute capability 8.0 or more (tensor-core
    bfloat16 GEMMs with float32 accumulation, :func:`cuda_bf16_screen_ok`). Elsewhere (AVX-512 without AMX,
    AMD, older GPUs) ``"auto"`` keeps the float32 path; ``backend="torch-bf16"`` forces the screen anywhere.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return cuda_bf16_screen_ok(device)
    return device.type == "cpu" and "amx_bf16" in cpu_flags()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable here for data on ``device`` (``"auto"`` excluded), fastest first.

    Args:
        device: where the training data live.

    Returns:
        A sublist of ``["torch-bf16", "faiss-gpu", "faiss-cpu", "torch"]``; ``"torch"`` and ``"torch-bf16"``
        are always present (``"torch-bf16"`` first only where :func:`has_fast_bfloat16`).
    """
    device = torch.device(device)
    faiss = import_faiss()
    found = ["torch-bf16"] if has_fast_bfloat16(device) else []
    if device.type == "cuda" and faiss_num_gpus(faiss) > 0:
        found.append("faiss-gpu")
    if faiss is not None:
        found.append("faiss-cpu")
    found.append("torch")
    if "torch-bf16" not in found:
        found.append("torch-bf16")
    return found


def resolve_backend(backend: str, device: torch.device, *, screen: bool = True) -> tuple[str, torch.device]:
    """The backend actually used for ``backend`` (``"auto"`` resolved) and the device the index lives on."""
    if backend not in BACKENDS:
        raise config_error(f"backend must be one of {list(BACKENDS)}; got {backend!r}.")
    faiss = import_faiss()
    if backend == "auto":
        if screen and has_fast_bfloat16(device):
            return "torch-bf16", device
        if device.type == "cuda" and faiss_num_gpus(faiss) > 0:
            return "faiss-gpu", device
        if device.type == "cpu" and faiss is not None:
            return "faiss-cpu", device
        return "torch", device
    if backend == "faiss-cpu":
        if faiss is None:
            raise ImportError("backend='faiss-cpu' needs faiss: `pip install faiss-cpu`, or pass backend='torch'.")
        return "faiss-cpu", torch.device("cpu")
    if backend == "faiss-gpu":
        if faiss is None or faiss_num_gpus(faiss) == 0:
            raise ImportError(
                "backend='faiss-gpu' needs a faiss build with GPU support and a visible CUDA GPU: "
                "`pip install 'lightning-memwatch[gpu]'` (faiss-gpu for CUDA 12), or pass backend='auto'."
            )
        if device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        return "faiss-gpu", device
    return backend, device


def matmul_input_unit(device: torch.device) -> float:
    """Unit roundoff of the *inputs* of a float32 matmul under torch's current precision settings.

    0 for IEEE float32 ("highest"), 2**-11 when TF32 may be used, 2**-8 when bfloat16 may be used.
    """
    unit = {"highest": 0.0, "high": 2.0**-11}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        unit = max(unit, 2.0**-11)
    return unit

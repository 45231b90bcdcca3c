"""Which backend runs a search: the documented ``"auto"`` rule, what is installed, matmul precision settings."""

from __future__ import annotations

import functools
import math
import time
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_memwatch._checks import config_error

__all__ = [
    "BACKENDS",
    "Backend",
    "available_backends",
    "faiss_num_gpus",
    "float32_tile_kernel",
    "has_fast_bfloat16",
    "has_fast_int8",
    "import_faiss",
    "matmul_input_unit",
    "onednn_float32_tile",
    "resolve_backend",
]

Backend = Literal["auto", "faiss-gpu", "faiss-cpu", "torch", "torch-bf16", "torch-int8"]
BACKENDS: tuple[str, ...] = get_args(Backend)
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


# CPU features with int8 dot products accumulated in int32 (VNNI) or int8 tiles (AMX): there torch's int8 GEMM
# (oneDNN) runs several times faster than its float32 GEMM with 8-bit codes (docs/performance.md). AVX2 alone
# needs 7-bit codes, whose wider bound makes uniform data slower than faiss-cpu: "auto" does not pick it there.
INT8_CPU_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def _int_mm_exact(limit: int) -> bool:
    """Whether ``torch._int_mm`` returns exact int32 sums for codes within ``+-limit`` on a few shapes."""
    g = torch.Generator().manual_seed(0)
    for m, d, n in ((1, 8, 3), (5, 24, 17), (33, 1032, 70)):
        a = torch.randint(-limit, limit + 1, (m, d), generator=g, dtype=torch.int8)
        b = torch.randint(-limit, limit + 1, (n, d), generator=g, dtype=torch.int8)
        a[0], b[0] = limit, -limit  # the largest sums of pairs
        if not torch.equal(torch._int_mm(a, b.T).to(torch.int64), a.to(torch.int64) @ b.to(torch.int64).T):
            return False
    return True


@functools.lru_cache(maxsize=1)
def int8_code_limit() -> int | None:
    """The largest code magnitude for which torch's CPU int8 GEMM (``torch._int_mm``) returns exact int32 sums
    here: 127, or 63, or None (no exact int8 GEMM: the screen is not offered).

    VNNI and AMX accumulate products in int32 (127). oneDNN's AVX2 kernel (no VNNI) adds pairs of products in
    saturating int16, which is wrong for codes beyond about +-64 (measured with ``ONEDNN_MAX_CPU_ISA=AVX2``) and
    exact within +-63 (7-bit codes: twice the step, a looser bound, the same exactness).
    """
    try:
        for limit in (127, 63):
            if _int_mm_exact(limit):
                return limit
    except (RuntimeError, AttributeError):  # pragma: no cover - torch without a CPU int8 GEMM
        return None
    return None


def int8_gemm_exact() -> bool:
    """Whether the int8 screen can run here (:func:`int8_code_limit` found an exact code range)."""
    return int8_code_limit() is not None


def has_fast_int8(device: torch.device | str = "cpu") -> bool:
    """Whether ``backend="auto"`` screens with exact int8 GEMMs for data on ``device``.

    The rule: a CPU with VNNI or AMX int8 instructions (``avx512_vnni``, ``avx_vnni``, ``amx_int8``) whose torch
    computes int8 GEMMs exactly (:func:`int8_code_limit`). Elsewhere (CUDA; AVX2 without VNNI, where only 7-bit
    codes are exact) ``"auto"`` keeps its other rules; ``backend="torch-int8"`` runs wherever some code range
    is exact.
    """
    device = torch.device(device)
    return device.type == "cpu" and bool(INT8_CPU_FLAGS & cpu_flags()) and int8_gemm_exact()


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable here for data on ``device`` (``"auto"`` excluded), fastest first.

    Args:
        device: where the training data live.

    Returns:
        A sublist of ``["torch-int8", "torch-bf16", "faiss-gpu", "faiss-cpu", "torch"]``; ``"torch"`` and
        ``"torch-bf16"`` are always present (``"torch-bf16"`` first only where :func:`has_fast_bfloat16`),
        ``"torch-int8"`` for CPU data wherever torch's int8 GEMM is exact (first where :func:`has_fast_int8`).
    """
    device = torch.device(device)
    faiss = import_faiss()
    int8 = device.type == "cpu" and int8_gemm_exact()
    found = ["torch-int8"] if int8 and has_fast_int8(device) else []
    if has_fast_bfloat16(device):
        found.append("torch-bf16")
    if device.type == "cuda" and faiss_num_gpus(faiss) > 0:
        found.append("faiss-gpu")
    if faiss is not None:
        found.append("faiss-cpu")
    found.append("torch")
    if "torch-bf16" not in found:
        found.append("torch-bf16")
    if int8 and "torch-int8" not in found:
        found.append("torch-int8")
    return found


def resolve_backend(backend: str, device: torch.device, *, screen: bool = True) -> tuple[str, torch.device]:
    """The backend actually used for ``backend`` (``"auto"`` resolved) and the device the index lives on."""
    if backend not in BACKENDS:
        raise config_error(f"backend must be one of {list(BACKENDS)}; got {backend!r}.")
    faiss = import_faiss()
    if backend == "auto":
        if screen and has_fast_int8(device):
            return "torch-int8", device
        if screen and has_fast_bfloat16(device):
            return "torch-bf16", device
        if device.type == "cuda" and faiss_num_gpus(faiss) > 0:
            return "faiss-gpu", device
        if device.type == "cpu" and faiss is not None:
            return "faiss-cpu", device
        return "torch", device
    if backend == "torch-int8":
        if device.type != "cpu" or not int8_gemm_exact():
            raise config_error(
                "backend='torch-int8' runs on CPU data, with a torch whose int8 GEMM (torch._int_mm) returns exact "
                "sums on this CPU; move the training data to the CPU, or pass backend='auto'."
            )
        return backend, device
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


def onednn_gemm(x: Tensor, rows: Tensor, bias: Tensor) -> Tensor:
    """``bias + x @ rows.T`` (float32, CPU) by oneDNN's GEMM: ``torch.ops.mkldnn._linear_pointwise``, the kernel
    of torch's own CPU linear layers under ``torch.compile``."""
    return torch.ops.mkldnn._linear_pointwise(x, rows, bias, "none", [], "")


def _onednn_close_to_float64() -> bool:
    """Whether :func:`onednn_gemm` returns IEEE float32 sums (within the float32 dot-product bound of float64's:
    a bfloat16 or TF32 product would miss it by orders of magnitude)."""
    g = torch.Generator().manual_seed(0)
    x, rows, bias = torch.randn(33, 1030, generator=g), torch.randn(70, 1030, generator=g), torch.randn(70, generator=g)
    got = onednn_gemm(x, rows, bias).double()
    want = bias.double() + x.double() @ rows.double().T
    scale = x.double().norm(dim=1)[:, None] * rows.double().norm(dim=1)[None, :] + bias.double().abs()
    return got.shape == want.shape and bool(((got - want).abs() <= 2 * 1040 * 2.0**-24 * scale).all())


def _seconds(fn: Any) -> float:
    """Best of three wall times of ``fn()`` after one warm-up (s)."""
    fn()
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=1)
def onednn_float32_tile() -> bool:
    """Whether the float32 pass on CPU runs its tiles through oneDNN's GEMM (:func:`onednn_gemm`) rather than
    torch's BLAS (``torch.addmm``): where oneDNN is present, returns IEEE float32 sums, and runs a tile faster,
    timed once per process (about 0.1 s; on the Zen 4 of ``docs/performance.md`` 213 against 188 GFLOP/s).
    Either kernel gives the same exact search (the bound of :mod:`.bounds` holds for any summation order); only
    the time differs. Reduced-precision matmul settings keep ``addmm`` (see :func:`matmul_input_unit`).
    """
    try:
        if not (torch.backends.mkldnn.is_available() and _onednn_close_to_float64()):
            return False
    except (RuntimeError, AttributeError, TypeError):  # pragma: no cover - torch without the op
        return False
    g = torch.Generator().manual_seed(1)
    x, rows, bias = torch.randn(512, 1024, generator=g), torch.randn(2048, 1024, generator=g), torch.zeros(2048)
    out = torch.empty(512, 2048)
    blas = _seconds(lambda: torch.addmm(bias, x, rows.T, beta=1, alpha=-2, out=out))
    onednn = _seconds(lambda: onednn_gemm(x * -2, rows, bias))
    return onednn < blas


def float32_tile_kernel(device: torch.device) -> str:
    """``"onednn"`` or ``"blas"``: the GEMM of the float32 pass's tiles on ``device`` now (oneDNN only on CPU,
    while torch's oneDNN is enabled, under IEEE float32 matmul settings, where :func:`onednn_float32_tile` found
    it faster)."""
    if device.type != "cpu" or matmul_input_unit(device) != 0.0 or not torch.backends.mkldnn.enabled:
        return "blas"
    precision = getattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision", "none")
    if precision not in ("none", "ieee"):
        return "blas"
    return "onednn" if onednn_float32_tile() else "blas"

"""Shared pieces of the adapters: value ranges, finding the sampling module, optional imports."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from torch import Tensor, nn

Range = tuple[float, float]
ModuleRef = str | Callable[[Any], Any] | None
"""Where an adapter finds its network at each call: an attribute name on the LightningModule (dots allowed,
e.g. ``"model.unet"``), a function ``fn(pl_module) -> network``, or None for the LightningModule itself."""


def check_range_arg(value: Sequence[float], name: str) -> Range:
    """``(low, high)`` as floats with ``high > low``, or a ValueError naming ``name``."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) of numbers; got {value!r}.") from None
    if not high > low:
        raise ValueError(f"{name} must be (low, high) with high > low; got {tuple(value)}.")
    return low, high


def map_range(x: Tensor, source: Range, target: Range, *, clamp: bool = False) -> Tensor:
    """Affine map of ``x`` from the value range ``source`` to ``target`` (a new tensor).

    Args:
        x: Images in ``source``.
        source: ``(low, high)`` the images are in, e.g. ``(-1, 1)`` for diffusers' convention.
        target: ``(low, high)`` of the training data MemWatch compares with, e.g. ``(0, 1)``.
        clamp: Clamp to ``source`` first (what diffusers' pipelines do before converting to images).
    """
    if clamp:
        x = x.clamp(source[0], source[1])
    if tuple(source) == tuple(target):
        return x if clamp else x.clone()
    scale = (target[1] - target[0]) / (source[1] - source[0])
    return (x - source[0]) * scale + target[0]


def resolve_module(pl_module: Any, ref: ModuleRef, what: str) -> Any:
    """The network ``ref`` points to, looked up at call time (so swapped-in weights are the ones used)."""
    if ref is None:
        return pl_module
    if callable(ref) and not isinstance(ref, str):
        return ref(pl_module)
    obj = pl_module
    for part in ref.split("."):
        if not hasattr(obj, part):
            raise AttributeError(
                f"{type(pl_module).__name__} has no attribute {ref!r} (the {what} this adapter samples with): "
                f"pass the attribute that holds it, a function `lambda module: module.<{what}>`, or None when "
                "the LightningModule itself is the network."
            )
        obj = getattr(obj, part)
    return obj


def module_device(net: Any, fallback: Any) -> Any:
    """The device of ``net``'s first parameter or buffer, else ``fallback``'s device."""
    if isinstance(net, nn.Module):
        for tensor in net.parameters():
            return tensor.device
        for tensor in net.buffers():
            return tensor.device
    return getattr(fallback, "device", "cpu")


def optional_import(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the install extra."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"This adapter needs `{module}`: pip install \"lightning-memwatch[{extra}]\" (or `pip install "
            f"{module.replace('_', '-')}`)."
        ) from err

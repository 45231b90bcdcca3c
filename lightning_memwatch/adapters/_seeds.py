"""Per-sample seeds from MemWatch's per-sample noise, for samplers that cannot take the noise itself."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor


def seeds_from_noise(noise: Tensor) -> list[int]:
    """One 63-bit seed per row of ``noise``, a function of that row's values alone.

    MemWatch draws row ``i`` of its initial noise from ``(seed, i)`` only, so the seed of row ``i`` is the same
    whatever the batch size or the number of ranks; samplers that draw their own noise can be seeded with it.
    """
    rows = noise.detach().to("cpu", torch.float32).contiguous().reshape(len(noise), -1)
    return [
        int.from_bytes(hashlib.blake2b(row.numpy().tobytes(), digest_size=8).digest(), "little") >> 1
        for row in rows
    ]


def seed_from_generator(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from ``generator`` (MemWatch's per-batch generator), or 0 without one."""
    if generator is None:
        return 0
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())

"""GlobalRNGSampler: samplers drawing from the global RNG repeat, stay per-sample, leave training RNG alone."""

from __future__ import annotations

import torch
from _tiny import Holder, images, one_evaluation

from lightning_memwatch.adapters import GlobalRNGSampler


def own_noise_sampler(module, n):
    """A sampler of the kind users have: it draws its noise from the global RNG and squashes it to (-1, 1)."""
    return torch.tanh(torch.randn(n, 1, 8, 8))


def test_global_rng_sampler_drives_memwatch_and_repeats_across_evaluations(tmp_path):
    sample_fn = GlobalRNGSampler(own_noise_sampler)
    watch = one_evaluation(tmp_path, Holder("net", torch.nn.Linear(1, 1)), sample_fn, images(16), (-1.0, 1.0))
    assert len(watch.history) == 1
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    first = sample_fn(None, 4, noise=noise)
    assert torch.equal(sample_fn(None, 4, noise=noise), first)  # the same seeds: identical by construction


def test_global_rng_sampler_is_per_sample_and_leaves_the_global_rng_untouched():
    sample_fn = GlobalRNGSampler(own_noise_sampler)
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(42)
    state = torch.random.get_rng_state()
    whole = sample_fn(None, 5, noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    parts = torch.cat([sample_fn(None, 2, noise=noise[:2]), sample_fn(None, 3, noise=noise[2:])])
    assert torch.equal(parts, whole)  # one call per sample with its own seed: identical by construction
    assert len({tuple(r.flatten()[:3].tolist()) for r in whole}) == 5  # distinct samples


def test_global_rng_sampler_per_batch_uses_the_generator():
    sample_fn = GlobalRNGSampler(own_noise_sampler, per_sample=False)
    state = torch.random.get_rng_state()
    a = sample_fn(None, 3, generator=torch.Generator().manual_seed(1))
    b = sample_fn(None, 3, generator=torch.Generator().manual_seed(1))
    c = sample_fn(None, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)

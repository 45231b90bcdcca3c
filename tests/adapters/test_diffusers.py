"""The diffusers adapters drive MemWatch, keep per-sample noise independent of the batch size, map ranges."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from _tiny import Holder, images, one_evaluation, tiny_unet  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMScheduler  # noqa: E402

from lightning_memwatch.adapters import DiffusersSampler, PipelineSampler  # noqa: E402


def test_diffusers_sampler_drives_one_memwatch_evaluation(tmp_path):
    train = images(16, 0.0, 1.0)
    sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 4, data_range=(0.0, 1.0))
    watch = one_evaluation(tmp_path, Holder("unet", tiny_unet()), sample_fn, train, (0.0, 1.0))
    assert [r["step"] for r in watch.history] == [0]
    record = watch.history[0]
    assert record["num_samples"] == 8 and 0.0 <= record["f_mem"] <= 1.0


def test_diffusers_sampler_noise_independent_of_batch_size():
    unet = tiny_unet().eval()
    sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 5, unet=None)
    noise = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    whole = sample_fn(unet, 6, noise=noise)
    parts = torch.cat([sample_fn(unet, 1, noise=noise[:1]), sample_fn(unet, 5, noise=noise[1:])])
    # same noise rows, other batch sizes: equal up to the kernels' batch-dependent rounding (values in [-1, 1])
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)
    other = sample_fn(unet, 6, noise=torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(2)))
    assert (other - whole).abs().max() > 1e-2  # the samples do depend on the noise


def test_diffusers_sampler_maps_model_range_to_data_range_and_leaves_scheduler_alone():
    unet = tiny_unet().eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    timesteps = scheduler.timesteps.clone()
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    raw = DiffusersSampler(scheduler, 3, unet=None)(unet, 4, generator=gen, noise=noise)
    gen = torch.Generator().manual_seed(0)
    unit = DiffusersSampler(scheduler, 3, unet=None, data_range=(0.0, 1.0))(unet, 4, generator=gen, noise=noise)
    assert raw.min() >= -1.0 and raw.max() <= 1.0  # clamped to diffusers' (-1, 1)
    torch.testing.assert_close(unit, (raw + 1.0) / 2.0, atol=1e-5, rtol=0)
    assert torch.equal(scheduler.timesteps, timesteps)  # the training scheduler is not modified


def test_diffusers_sampler_names_the_fix_for_a_missing_denoiser():
    sample_fn = DiffusersSampler(DDIMScheduler(), 2, unet="model.unet")
    with pytest.raises(AttributeError, match="model.unet"):
        sample_fn(Holder("unet", tiny_unet()), 2, noise=torch.zeros(2, 1, 8, 8))
    with pytest.raises(TypeError, match="diffusers scheduler"):
        DiffusersSampler(object())


def test_pipeline_sampler_drives_memwatch_and_is_independent_of_batch_size(tmp_path):
    module = Holder("unet", tiny_unet())
    module.pipe = DDIMPipeline(unet=module.unet, scheduler=DDIMScheduler(num_train_timesteps=1000))  # shares unet
    sample_fn = PipelineSampler("pipe", 4, data_range=(-1.0, 1.0))
    watch = one_evaluation(tmp_path, module, sample_fn, images(16), (-1.0, 1.0))
    assert len(watch.history) == 1 and 0.0 <= watch.history[0]["f_mem"] <= 1.0

    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(4))
    whole = sample_fn(module, 5, noise=noise)
    parts = torch.cat([sample_fn(module, 2, noise=noise[:2]), sample_fn(module, 3, noise=noise[2:])])
    assert whole.shape == (5, 1, 8, 8) and whole.min() >= -1.0 and whole.max() <= 1.0
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)  # one generator per sample, seeded from its noise


def test_a_forgotten_data_range_is_caught_by_memwatchs_range_check(tmp_path):
    """diffusers' [-1, 1] samples for [0, 1] data: the adapter maps only when told; MemWatch raises otherwise."""
    train = images(16, 0.0, 1.0)
    forgot = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 3)  # data_range left at diffusers' (-1, 1)
    with pytest.raises(ValueError, match=r"data_range \(0, 1\)"):
        one_evaluation(tmp_path, Holder("unet", tiny_unet()), forgot, train, (0.0, 1.0))

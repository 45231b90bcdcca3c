"""The adapters pass MemWatch's per-sample classes to class-conditional models (tiny real models, seeded)."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader, TensorDataset

from lightning_memwatch import MemWatch

pytest.importorskip("diffusers")
pytest.importorskip("denoising_diffusion_pytorch")

from _tiny import Holder, images, tiny_class_unet, tiny_guided_diffusion, tiny_unet  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

from lightning_memwatch.adapters import DiffusersSampler, LucidrainsSampler  # noqa: E402

LABELS = torch.arange(16) % 4


def evaluate_once(tmp_path, module, sample_fn, train, data_range) -> MemWatch:
    """One evaluation at step 0 on labelled training data, balanced classes."""
    watch = MemWatch(num_samples=8, sample_batch_size=3, schedule=[0], sample_fn=sample_fn, data_range=data_range,
                     bootstrap=50, log_images=False, verbose=False, labels="balanced")  # fmt: skip
    trainer = Trainer(max_steps=1, callbacks=[watch], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(module, DataLoader(TensorDataset(train, LABELS), batch_size=8))
    return watch


def test_diffusers_sampler_passes_class_labels_to_a_class_conditional_unet(tmp_path):
    unet = tiny_class_unet().eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    sample_fn = DiffusersSampler(scheduler, 3, unet=None)
    noise = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3])
    got = sample_fn(unet, 4, noise=noise, labels=labels)

    # the same reverse loop written out, the classes given to the UNet as its class_labels
    loop = DDIMScheduler(num_train_timesteps=1000)
    loop.set_timesteps(3)
    x = noise.clone()
    with torch.no_grad():
        for t in loop.timesteps:
            x = loop.step(unet(x, t.reshape(1).expand(4), class_labels=labels).sample, t, x).prev_sample
    torch.testing.assert_close(got, x.clamp(-1, 1), atol=1e-5, rtol=0)
    assert (sample_fn(unet, 4, noise=noise, labels=labels.flip(0)) - got).abs().max() > 1e-3  # classes matter
    assert DiffusersSampler(scheduler, 3).takes_labels(Holder("unet", unet))
    assert not DiffusersSampler(scheduler, 3).takes_labels(Holder("unet", tiny_unet()))

    watch = evaluate_once(tmp_path, Holder("unet", tiny_class_unet()), DiffusersSampler(scheduler, 3),
                          images(16), (-1.0, 1.0))  # fmt: skip
    assert sorted(watch.history[0].per_class) == [0, 1, 2, 3]
    assert [c.num_samples for c in watch.history[0].per_class.values()] == [2, 2, 2, 2]


def test_lucidrains_sampler_drives_the_classifier_free_guidance_unet(tmp_path):
    diffusion = tiny_guided_diffusion().eval()
    sample_fn = LucidrainsSampler(diffusion=None, cond_scale=3.0)
    classes = torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    noise = torch.randn((4, 1, 8, 8))
    torch.manual_seed(5)  # the package's own sampler draws the same initial noise from the global RNG
    expected = diffusion.sample(classes, cond_scale=3.0)
    got = sample_fn(diffusion, 4, noise=noise, labels=classes)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (sample_fn(diffusion, 4, noise=noise, labels=classes.flip(0)) - got).abs().max() > 1e-3
    assert sample_fn.takes_labels(diffusion)
    with pytest.raises(ValueError, match="needs `labels`"):
        sample_fn(diffusion, 4, noise=noise)

    watch = evaluate_once(tmp_path, Holder("diffusion", tiny_guided_diffusion()), LucidrainsSampler(),
                          images(16, 0.0, 1.0), (0.0, 1.0))  # fmt: skip
    assert sorted(watch.history[0].per_class) == [0, 1, 2, 3]


def test_the_probe_scores_a_class_conditional_unet_with_its_classes(tmp_path):
    """The probe's loss of a class-conditional UNet asks for each pair's class (diffusers raised 'class_labels
    should be provided' mid-fit before the probe refused it; now it is probed); held-out images without classes
    fail at setup, naming heldout_labels=."""
    from lightning_memwatch import LossGapProbe
    from lightning_memwatch._checks import ConfigError

    def fit(probe, max_steps):
        sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 3)
        watch = MemWatch(num_samples=8, schedule=[2], sample_fn=sample_fn, bootstrap=10, log_images=False,
                         verbose=False)  # fmt: skip
        trainer = Trainer(max_steps=max_steps, callbacks=[watch, probe], logger=False, accelerator="cpu",
                          devices=1, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir=str(tmp_path))  # fmt: skip
        trainer.fit(Holder("unet", tiny_class_unet()), DataLoader(TensorDataset(images(16), LABELS), batch_size=8))
        return trainer

    with pytest.raises(ConfigError, match=r"class-conditional .*`LossGapProbe\(heldout_labels="):
        fit(LossGapProbe(heldout_data=images(16, seed=1), num_triples=8, every_n_train_steps=2), 2)
    heldout = TensorDataset(images(16, seed=1), LABELS.flip(0))
    probe = LossGapProbe(heldout_data=heldout, num_triples=8, every_n_train_steps=2)
    assert fit(probe, 2).global_step == 2
    assert [r.step for r in probe.history] == [0, 2]
    assert torch.equal(probe.triples.labels, LABELS.flip(0)[probe.triples.heldout_indices])


def test_diffusers_loss_gives_the_classes_to_the_unet():
    unet = tiny_class_unet().eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(3)
    x0, noise = images(4), torch.randn((4, 1, 8, 8), generator=g)
    t, labels = torch.tensor([10, 200, 500, 900]), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        got = DiffusersSampler(scheduler, 3, unet=None).denoising_loss(unet, x0, t, noise, labels)
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=labels).sample
        other = DiffusersSampler(scheduler, 3, unet=None).denoising_loss(unet, x0, t, noise, labels.flip(0))
    torch.testing.assert_close(got, (pred - noise).pow(2).flatten(1).mean(1), atol=1e-6, rtol=1e-5)
    assert (got - other).abs().max() > 1e-6  # the classes reach the UNet


def test_lucidrains_loss_is_the_guided_models_conditional_p_losses():
    diffusion = tiny_guided_diffusion().eval()
    sample_fn = LucidrainsSampler(diffusion=None)
    g = torch.Generator().manual_seed(4)
    x0, noise = images(4, 0.0, 1.0), torch.randn((4, 1, 8, 8), generator=g)
    t, classes = torch.tensor([1, 20, 50, 90]) % diffusion.num_timesteps, torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        got = sample_fn.denoising_loss(diffusion, x0, t, noise, classes)
        keep = torch.ones(4, dtype=torch.bool)
        want = diffusion.p_losses(x0 * 2 - 1, t, classes=classes, noise=noise, cond_keep_mask=keep,
                                  loss_reduction="none")  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="needs `labels`"):
        sample_fn.denoising_loss(diffusion, x0, t, noise)

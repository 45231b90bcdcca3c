"""The lucidrains adapter reproduces GaussianDiffusion's own DDIM from given noise and drives MemWatch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("denoising_diffusion_pytorch")

from _tiny import Holder, images, one_evaluation, tiny_gaussian_diffusion  # noqa: E402

from lightning_memwatch.adapters import LucidrainsSampler  # noqa: E402


def test_lucidrains_sampler_drives_one_memwatch_evaluation(tmp_path):
    train = images(16, 0.0, 1.0)  # auto_normalize=True: the package's images live in [0, 1]
    watch = one_evaluation(tmp_path, Holder("diffusion", tiny_gaussian_diffusion()), LucidrainsSampler(), train, (0, 1))
    assert [r["step"] for r in watch.history] == [0]
    assert 0.0 <= watch.history[0]["f_mem"] <= 1.0


def test_lucidrains_sampler_matches_the_packages_ddim_given_the_same_initial_noise():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=5).eval()
    shape = (4, 1, 8, 8)
    torch.manual_seed(7)
    noise = torch.randn(shape)  # what ddim_sample draws first after the same seed
    torch.manual_seed(7)
    theirs = diffusion.ddim_sample(shape)
    ours = LucidrainsSampler(None)(diffusion, 4, noise=noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_lucidrains_sampler_independent_of_batch_size_and_leaves_global_rng_untouched():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=5).eval()
    sample_fn = LucidrainsSampler(None, data_range=(-1.0, 1.0))
    noise = torch.randn((5, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    whole = sample_fn(diffusion, 5, noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    parts = torch.cat([sample_fn(diffusion, 2, noise=noise[:2]), sample_fn(diffusion, 3, noise=noise[2:])])
    torch.testing.assert_close(parts, whole, atol=1e-4, rtol=0)
    assert whole.min() >= -1.0 and whole.max() <= 1.0 and whole.min() < 0.0  # mapped from (0, 1) to (-1, 1)


def test_lucidrains_ancestral_sampler_uses_the_generator_not_the_global_rng():
    diffusion = tiny_gaussian_diffusion(sampling_timesteps=None, timesteps=10).eval()  # no DDIM: ancestral
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    a = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(5), noise=noise)
    b = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(5), noise=noise)
    c = LucidrainsSampler(None)(diffusion, 3, generator=torch.Generator().manual_seed(6), noise=noise)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same generator, same computation: equal by construction
    assert (a - c).abs().max() > 1e-3


def test_lucidrains_sampler_names_what_is_missing():
    with pytest.raises(TypeError, match="GaussianDiffusion"):
        LucidrainsSampler(None)(torch.nn.Linear(2, 2), 2, noise=torch.zeros(2, 1, 8, 8))


# -- the loss-gap probe's loss ---------------------------------------------------------------------------------
def _loss_inputs(n: int = 6, low: float = 0.0, high: float = 1.0):
    x0 = images(n, low, high)
    t = torch.tensor([0, 1, 20, 50, 80, 99][:n])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    return x0, t, noise


@pytest.mark.parametrize("objective", ["pred_noise", "pred_x0", "pred_v"])
@pytest.mark.parametrize("min_snr", [False, True])
def test_lucidrains_loss_equals_p_losses_on_the_same_inputs(objective, min_snr):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(0)
    net = Unet(dim=8, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=4)
    diffusion = GaussianDiffusion(
        net, image_size=8, timesteps=100, objective=objective, min_snr_loss_weight=min_snr
    ).eval()
    x0, t, noise = _loss_inputs()
    sampler = LucidrainsSampler(None)
    with torch.no_grad():
        ours = sampler.denoising_loss(diffusion, x0, t, noise)
        scalar = diffusion(x0, times=t, noise=noise.clone())  # the package's training loss: forward -> p_losses
    assert ours.shape == (6,) and torch.isfinite(ours).all() and (ours > 0).all()
    # same ops in the same order: equal up to float rounding, scaled to the loss (pred_x0's weights reach 1e3)
    assert float(ours.mean()) == pytest.approx(float(scalar), rel=1e-5)
    try:
        with torch.no_grad():
            per_sample = diffusion.p_losses(diffusion.normalize(x0), t, noise=noise.clone(), loss_reduction="none")
    except TypeError:  # releases before loss_reduction: the scalar above is the check
        return
    torch.testing.assert_close(ours, per_sample, rtol=1e-5, atol=1e-6)
    assert sampler.num_timesteps(diffusion) == 100


def test_lucidrains_loss_maps_data_range_to_the_models():
    unit_model = tiny_gaussian_diffusion(auto_normalize=True).eval()  # takes [0, 1]
    x0, t, noise = _loss_inputs()
    with torch.no_grad():
        a = LucidrainsSampler(None).denoising_loss(unit_model, x0, t, noise)
        b = LucidrainsSampler(None, data_range=(-1.0, 1.0)).denoising_loss(unit_model, x0 * 2 - 1, t, noise)
        signed_model = tiny_gaussian_diffusion(auto_normalize=False).eval()  # same weights, takes [-1, 1]
        c = LucidrainsSampler(None, data_range=(0.0, 1.0)).denoising_loss(signed_model, x0, t, noise)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["memwatch", "sampler"])
def test_probe_reads_the_lucidrains_loss_in_a_tiny_fit(tmp_path, how):
    from _tiny import Trained, fit_with_probe

    from lightning_memwatch import MemWatch
    from lightning_memwatch.callbacks.probe import LOSS_GAP, LossGapProbe
    from lightning_memwatch.metrics.loss_gap import measure_loss_gap

    sample_fn = LucidrainsSampler("diffusion", data_range=(0.0, 1.0))
    train, heldout = images(16, 0.0, 1.0), images(16, 0.0, 1.0, seed=1)
    kwargs = {"sampler": sample_fn} if how == "sampler" else {}
    probe = LossGapProbe(heldout_data=heldout, train_data=train, num_triples=8, every_n_train_steps=2, **kwargs)
    watch = MemWatch(
        train_data=train,
        num_samples=4,
        schedule=[4],
        sample_fn=sample_fn,
        data_range=(0.0, 1.0),
        bootstrap=10,
        log_images=False,
        verbose=False,
    )
    torch.manual_seed(0)
    module = Trained("diffusion", tiny_gaussian_diffusion(), lambda m, x0: m.diffusion(x0))
    trainer = fit_with_probe(tmp_path, module, train, heldout, [watch] if how == "memwatch" else [], probe)
    assert [r.step for r in probe.history] == [0, 2, 4] and probe.triples.edges[-1] == 100
    assert float(trainer.callback_metrics[LOSS_GAP]) == pytest.approx(probe.history[-1].gap, rel=1e-6)
    module.eval()
    again = measure_loss_gap(lambda x0, t, noise: sample_fn.denoising_loss(module, x0, t, noise), probe.triples)
    assert again.loss_train == pytest.approx(probe.history[-1].loss_train, rel=1e-4)
    assert again.loss_heldout == pytest.approx(probe.history[-1].loss_heldout, rel=1e-4)


def test_lucidrains_loss_names_what_is_missing():
    with pytest.raises(TypeError, match="GaussianDiffusion"):
        LucidrainsSampler(None).num_timesteps(torch.nn.Linear(2, 2))

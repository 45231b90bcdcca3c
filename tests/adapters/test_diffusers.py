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


# -- the loss-gap probe's loss ---------------------------------------------------------------------------------
def _loss_inputs(n: int = 6):
    x0 = images(n, 0.0, 1.0)
    t = torch.tensor([0, 1, 250, 500, 900, 999][:n])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    return x0, t, noise


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_diffusers_loss_is_the_training_objective_of_the_prediction_type(prediction_type):
    import torch.nn.functional as F

    unet = tiny_unet().eval()
    train_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    sample_fn = DiffusersSampler(
        DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type), 3, unet=None, data_range=(0.0, 1.0)
    )
    x0, t, noise = _loss_inputs()
    with torch.no_grad():
        ours = sample_fn.denoising_loss(unet, x0, t, noise)
        # diffusers' training example, written out: images in [-1, 1], add_noise, the prediction type's target
        x = x0 * 2 - 1
        pred = unet(train_scheduler.add_noise(x, noise, t), t).sample
        target = {"epsilon": noise, "sample": x, "v_prediction": train_scheduler.get_velocity(x, noise, t)}
        theirs = F.mse_loss(pred, target[prediction_type], reduction="none").mean(dim=(1, 2, 3))
        scalar = F.mse_loss(pred, target[prediction_type])
    assert ours.shape == (6,) and torch.isfinite(ours).all() and (ours > 0).all()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)  # same ops, other kernels possible: close
    assert float(ours.mean()) == pytest.approx(float(scalar), rel=1e-5)
    assert sample_fn.num_timesteps() == 1000
    if prediction_type != "epsilon":  # the objective is read from the scheduler: another target, another loss
        eps_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 3, unet=None, data_range=(0.0, 1.0))
        assert (eps_fn.denoising_loss(unet, x0, t, noise) - ours).abs().max() > 1e-3


def test_diffusers_loss_maps_data_range_and_pipeline_loss_is_the_same():
    module = Holder("unet", tiny_unet()).eval()
    x0, t, noise = _loss_inputs()
    unit = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 3, data_range=(0.0, 1.0))
    raw = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 3)  # data already in the model's [-1, 1]
    with torch.no_grad():
        a = unit.denoising_loss(module, x0, t, noise)
        b = raw.denoising_loss(module, x0 * 2 - 1, t, noise)
        module.pipe = DDIMPipeline(unet=module.unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        piped = PipelineSampler("pipe", 3, data_range=(0.0, 1.0))
        c = piped.denoising_loss(module, x0, t, noise)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-6)  # the pipeline's unet and scheduler, same objective
    assert piped.num_timesteps(module) == 1000


def test_diffusers_loss_names_what_it_cannot_do():
    odd = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000, prediction_type="flow"), 3, unet=None)
    with pytest.raises(ValueError, match=r"prediction_type in \('epsilon', 'v_prediction', 'sample'\).*'flow'"):
        odd.num_timesteps()
    with pytest.raises(ValueError, match=r"t \(B,\)"):
        DiffusersSampler(DDIMScheduler(), 3, unet=None).denoising_loss(
            tiny_unet(), torch.zeros(2, 1, 8, 8), torch.zeros(3, dtype=torch.long), torch.zeros(2, 1, 8, 8)
        )


@pytest.mark.parametrize("how", ["memwatch", "sampler"])
def test_probe_reads_the_diffusers_loss_in_a_tiny_fit(tmp_path, how):
    import torch.nn.functional as F
    from _tiny import Trained, fit_with_probe

    from lightning_memwatch import MemWatch
    from lightning_memwatch.callbacks.probe import LOSS_GAP, LossGapProbe
    from lightning_memwatch.metrics.loss_gap import measure_loss_gap

    train_scheduler = DDPMScheduler(num_train_timesteps=1000)

    def diffusers_loss(module, x0):  # diffusers' training example, on data in [0, 1]
        x = x0 * 2 - 1
        noise = torch.randn_like(x)
        t = torch.randint(0, 1000, (len(x),))
        return F.mse_loss(module.unet(train_scheduler.add_noise(x, noise, t), t).sample, noise)

    sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 2, data_range=(0.0, 1.0))
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
    module = Trained("unet", tiny_unet(), diffusers_loss)
    trainer = fit_with_probe(tmp_path, module, train, heldout, [watch] if how == "memwatch" else [], probe)
    assert [r.step for r in probe.history] == [0, 2, 4]
    assert probe.triples.edges[-1] == 1000 and int(probe.triples.t.max()) < 1000
    assert all(torch.isfinite(torch.tensor([r.gap, r.loss_train, r.loss_heldout])).all() for r in probe.history)
    assert float(trainer.callback_metrics[LOSS_GAP]) == pytest.approx(probe.history[-1].gap, rel=1e-6)
    # the last reading is the adapter's loss on the probe's triples, with the weights fit ended with
    module.eval()
    again = measure_loss_gap(lambda x0, t, noise: sample_fn.denoising_loss(module, x0, t, noise), probe.triples)
    assert again.loss_train == pytest.approx(probe.history[-1].loss_train, rel=1e-4)
    assert again.loss_heldout == pytest.approx(probe.history[-1].loss_heldout, rel=1e-4)


def test_probe_reads_the_averaged_weights_memwatch_scores(tmp_path):
    """Under EMAWeightAveraging the probe's readings use the average (MemWatch's scored weights), not the raw ones."""
    import torch.nn.functional as F
    from _tiny import Trained, fit_with_probe
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from lightning_memwatch import MemWatch
    from lightning_memwatch.callbacks.probe import LossGapProbe
    from lightning_memwatch.metrics.loss_gap import measure_loss_gap

    train_scheduler = DDPMScheduler(num_train_timesteps=1000)

    def diffusers_loss(module, x0):
        x, noise = x0 * 2 - 1, torch.randn_like(x0)
        t = torch.randint(0, 1000, (len(x),))
        return F.mse_loss(module.unet(train_scheduler.add_noise(x, noise, t), t).sample, noise)

    sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), 2, data_range=(0.0, 1.0))
    train, heldout = images(16, 0.0, 1.0), images(16, 0.0, 1.0, seed=1)
    probe = LossGapProbe(heldout_data=heldout, train_data=train, num_triples=8, every_n_train_steps=2)
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
    raw_losses = []  # listeners run after the reading, with the raw weights back in the module

    def loss_of(module):
        was = module.training
        module.eval()
        with torch.no_grad():
            value = measure_loss_gap(lambda x0, t, n: sample_fn.denoising_loss(module, x0, t, n), probe.triples)
        module.train(was)
        return value.loss_train

    torch.manual_seed(0)
    module = Trained("unet", tiny_unet(), diffusers_loss)
    probe.add_listener(lambda reading: raw_losses.append(loss_of(module)))
    fit_with_probe(tmp_path, module, train, heldout, [EMAWeightAveraging(decay=0.5), watch], probe)
    assert watch.scored_weights.name == "averaged" and [r.step for r in probe.history] == [0, 2, 4]
    last = probe.history[-1].loss_train
    assert abs(last - raw_losses[-1]) > 1e-4 * abs(last)  # raw and averaged weights give other losses
    assert last == pytest.approx(loss_of(module), rel=1e-4)  # fit ends with the average in the module

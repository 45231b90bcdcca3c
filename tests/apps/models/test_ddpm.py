"""The DDPM LightningModule: the paper's training step, one optimizer step per recipe model, DDIM sampling."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_memwatch.apps.data import DigitsDataModule, GMMDataModule
from lightning_memwatch.apps.models import DDPM, ResidualMLP, UNet

torch.set_num_threads(1)


def _trainer(steps: int = 1) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )


class _RecordT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(t.clone())
        return x * self.scale


def test_training_timesteps_are_uniform_on_1_to_999_and_loss_is_noise_mse() -> None:
    net = _RecordT()
    module = DDPM(net)
    torch.manual_seed(0)
    loss = module.diffusion_loss(torch.zeros(4096, 2))
    t = torch.cat(net.seen)
    assert int(t.min()) == 1 and int(t.max()) == 999
    assert abs(t.float().mean().item() - 500) < 15
    # x0 = 0, so x_t = sqrt(1 - a_t) eps and the loss is E[(sqrt(1 - a_t) - 1)^2 eps^2] > 0
    assert 0 < loss.item() < 1
    fixed = DDPM(_RecordT(), fixed_timestep=7)
    fixed.diffusion_loss(torch.zeros(3, 2))
    assert fixed.denoiser.seen[0].tolist() == [7, 7, 7]


def test_optimizers_follow_the_paper() -> None:
    sgd = DDPM(UNet(8)).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.defaults["momentum"] == 0.95 and sgd.defaults["lr"] == 1e-2 and not sgd.defaults["nesterov"]
    adam = DDPM(UNet(8), optimizer="adam", lr=1e-4).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["lr"] == 1e-4
    trainable = sum(p.numel() for g in sgd.param_groups for p in g["params"])
    assert trainable == sum(p.numel() for p in UNet(8).parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        DDPM(UNet(8), optimizer="rmsprop")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "make"),
    [
        (
            "unet-digits32",
            lambda: (DDPM(UNet(8)), DigitsDataModule(n=4, image_size=32, normalization="center")),
        ),
        ("mlp-gmm", lambda: (DDPM(ResidualMLP(8), lr=6e-3), GMMDataModule(dim=8, n=16, num_heldout=4))),
        ("mlp-digits", lambda: (DDPM(ResidualMLP(64), optimizer="adam", lr=1e-3), DigitsDataModule(n=8))),
    ],
)
def test_one_optimizer_step_then_one_ddim_sample(name: str, make) -> None:
    module, datamodule = make()
    before = [p.detach().clone() for p in module.denoiser.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(1)
        trainer.fit(module, datamodule)
    assert trainer.global_step == 1
    after = [p.detach() for p in module.denoiser.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    # sample_shape and data_range come from the attached datamodule
    assert module.sample_shape == datamodule.sample_shape
    assert module.data_range == datamodule.data_range
    samples = module.sample(3, generator=torch.Generator().manual_seed(0), num_steps=3)
    assert samples.shape == (3, *datamodule.sample_shape) and samples.dtype == torch.float32
    assert bool(torch.isfinite(samples).all())
    if datamodule.data_range is not None:
        lo, hi = datamodule.data_range
        assert float(samples.min()) >= lo and float(samples.max()) <= hi
    assert module.training  # restored


def test_sample_is_deterministic_and_takes_memwatch_noise() -> None:
    torch.manual_seed(0)  # the UNet's weights: never the global RNG state other tests left behind
    module = DDPM(UNet(8), sample_shape=(1, 32, 32), sample_steps=4)
    module.train()  # dropout must not leak into sampling
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a, b = module.sample(2, generator=gen()), module.sample(2, generator=gen())
    # bit-exact by construction: the same weights, noise and batch size run the same kernels
    assert torch.equal(a, b) and a.shape == (2, 1, 32, 32)
    assert module.training and module.denoiser.training
    noise = torch.randn(2, 1, 32, 32, generator=gen())
    kept = noise.clone()
    from_noise = module.sample(2, noise=noise)
    assert torch.equal(noise, kept)
    assert torch.equal(from_noise, a)  # same noise as the generator draws, same batch size 2: same kernels
    # per-sample: sample i depends only on noise row i. Batch 1 and batch 2 run other GEMM blockings, so the
    # bits differ (3e-7 of the largest |x|, which reaches ~700 for this untrained, unclamped UNet, on an
    # AVX-512/AMX Xeon): compare with a tolerance scaled to the samples' magnitude.
    alone = module.sample(1, noise=noise[1:])
    scale = float(from_noise.abs().max())
    assert float((alone - from_noise[1:]).abs().max()) <= 1e-5 * scale
    with pytest.raises(ValueError, match="num_samples"):
        module.sample(3, noise=noise)


def test_sample_default_is_ddim_100_and_clipping_follows_data_range() -> None:
    net = _RecordT()
    module = DDPM(net, sample_shape=(2,), data_range=(-0.25, 0.5))
    out = module.sample(64, generator=torch.Generator().manual_seed(0))
    assert len(net.seen) == 99 and net.seen[0][0].item() == 999 and net.seen[-1][0].item() == 10
    assert float(out.min()) == -0.25 and float(out.max()) == 0.5
    raw = DDPM(_RecordT(), sample_shape=(2,), data_range=(-0.25, 0.5), clip_samples=False)
    assert float(raw.sample(64, generator=torch.Generator().manual_seed(0)).abs().max()) > 0.5


def test_missing_sample_shape_error_names_the_fix() -> None:
    with pytest.raises(ValueError, match="sample_shape"):
        DDPM(UNet(8)).sample(2)


def test_ema_tracks_the_weights_and_is_sampled() -> None:
    module = DDPM(ResidualMLP(8), ema_decay=0.5, optimizer="adam", lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(2).fit(module, GMMDataModule(dim=8, n=16, num_heldout=4))
    assert module.ema_denoiser is not None
    raw = torch.nn.utils.parameters_to_vector(module.denoiser.parameters())
    ema = torch.nn.utils.parameters_to_vector(module.ema_denoiser.parameters())
    assert not torch.equal(raw, ema)
    noise = torch.randn(4, 8)
    from_ema = module.sample(4, noise=noise, num_steps=3)
    from_raw = DDPM(module.denoiser).sample(4, noise=noise, num_steps=3)
    assert not torch.equal(from_ema, from_raw)


def test_sample_works_under_inference_mode_as_memwatch_calls_it() -> None:
    module = DDPM(ResidualMLP(4), sample_shape=(4,), sample_steps=3)
    noise = torch.randn(5, 4)
    expected = module.sample(5, noise=noise)
    with torch.inference_mode():
        got = module.sample(5, noise=noise, generator=torch.Generator().manual_seed(0))
    # eta = 0: the generator adds nothing once noise is given. Bit-exact because both calls run batch 5 through
    # the same kernels (inference mode changes no kernel choice)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "make_denoiser", [lambda k: UNet(8, num_classes=k), lambda k: ResidualMLP(64, 32, 2, num_classes=k)]
)
def test_class_embedding_makes_the_ddpm_class_conditional(make_denoiser) -> None:
    from lightning_memwatch.sampling import accepts_labels

    torch.manual_seed(0)
    shape = (1, 8, 8) if isinstance(make_denoiser(3), ResidualMLP) else (1, 32, 32)
    module = DDPM(make_denoiser(3), sample_shape=shape, sample_steps=4).eval()
    assert module.conditional and accepts_labels(module.sample)
    plain = DDPM(make_denoiser(None), sample_shape=shape, sample_steps=4)
    assert not plain.conditional and not accepts_labels(plain.sample)  # MemWatch passes it no labels

    noise = torch.randn((3, *shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained embedding: the classes must change the samples
        module.denoiser.class_embedding.weight.normal_(0, 1)
    labels = torch.tensor([0, 1, 2])
    out = module.sample(3, noise=noise, labels=labels)
    assert (module.sample(3, noise=noise, labels=labels.flip(0)) - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pass `labels`"):
        module.sample(3, noise=noise)

    module.train()
    x0 = torch.rand((4, *shape)) * 2 - 1
    loss = module.training_step((x0, torch.tensor([0, 1, 2, 0])), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        module.training_step(x0, 0)

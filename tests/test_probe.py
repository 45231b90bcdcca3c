import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from toys import toy_images, toy_loader

from lightning_memwatch import MemWatch
from lightning_memwatch.apps.models import DDPM, ResidualMLP
from lightning_memwatch.callbacks.probe import LOSS_GAP, PROBE_LOSS_TRAIN, LossGapProbe
from lightning_memwatch.metrics.loss_gap import (
    band_names,
    draw_probe_triples,
    loss_sums,
    measure_loss_gap,
    probe_period,
    reading_from_sums,
)

TRAIN = toy_images(32, seed=0)
HELDOUT = toy_images(48, seed=1)


def tiny_ddpm(seed: int = 0, **kwargs) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(ResidualMLP(dim=64, width=16, num_blocks=1), optimizer="adam", lr=1e-2, **kwargs)


def make_trainer(tmp_path, callbacks, max_steps=7, **kwargs):
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kwargs,
    )


# -- the maths ----------------------------------------------------------------------------------------------
def test_known_gap_overall_and_per_band():
    # loss = 1 + x0_mean * t / T: training images (all 0) have loss 1, held-out images (all 1) 1 + t/T
    train, heldout = torch.zeros(40, 1, 2, 2), torch.ones(40, 1, 2, 2)
    triples = draw_probe_triples(train, heldout, num_triples=400, num_timesteps=101, num_bands=4, seed=3)
    assert triples.edges == (1, 26, 51, 76, 101)
    assert torch.bincount(triples.band).tolist() == [100] * 4  # stratified: as many triples in every band
    for b in range(4):
        ts = triples.t[triples.band == b]
        assert ts.min() >= triples.edges[b] and ts.max() < triples.edges[b + 1]

    def loss(x0, t, noise):
        return 1.0 + x0.flatten(1).mean(1) * t.double() / 101

    reading = measure_loss_gap(loss, triples, step=5)
    mean_held = float((1 + triples.t.double() / 101).mean())
    assert reading.step == 5
    assert reading.loss_train == pytest.approx(1.0, rel=1e-12)
    assert reading.loss_heldout == pytest.approx(mean_held, rel=1e-12)
    assert reading.gap == pytest.approx((mean_held - 1) / mean_held, rel=1e-12)
    for b, gap in enumerate(reading.band_gaps):
        held = float((1 + triples.t[triples.band == b].double() / 101).mean())
        assert gap == pytest.approx((held - 1) / held, rel=1e-12)
    assert list(reading.band_gaps) == sorted(reading.band_gaps)  # larger t, larger gap in this toy


def test_heldout_equal_to_training_gives_zero_gap():
    model = tiny_ddpm()
    triples = draw_probe_triples(TRAIN, TRAIN.clone(), num_triples=50, num_timesteps=1000, seed=7)
    assert torch.equal(triples.train, triples.heldout)  # the same rows, t and noise: zero by construction
    reading = measure_loss_gap(model.denoising_loss, triples)
    assert reading.loss_train > 0
    assert reading.gap == 0.0 and reading.band_gaps == (0.0,) * 4


def test_training_data_is_never_altered():
    train, heldout = TRAIN.clone(), HELDOUT.clone()
    triples = draw_probe_triples(train, heldout, num_triples=64, seed=0)
    triples.train.add_(1.0)
    assert torch.equal(train, TRAIN) and torch.equal(heldout, HELDOUT)


def test_rank_shares_add_up_to_the_whole():
    # what LossGapProbe does under DDP: each rank sums a strided share, the sums are added
    model = tiny_ddpm()
    triples = draw_probe_triples(TRAIN, HELDOUT, num_triples=37, seed=1)
    whole = loss_sums(model.denoising_loss, triples)
    parts = sum(loss_sums(model.denoising_loss, triples, range(r, 37, 3)) for r in range(3))
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)  # batch layouts differ: not bitwise
    a, b = reading_from_sums(whole, 0), reading_from_sums(parts, 0)
    assert a.gap == pytest.approx(b.gap, rel=1e-5, abs=1e-7)


def test_ddpm_denoising_loss_is_the_per_sample_training_loss():
    model = tiny_ddpm()
    x0 = TRAIN[:6]
    t = torch.tensor([1, 5, 100, 500, 900, 999])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    losses = model.denoising_loss(x0, t, noise)
    assert losses.shape == (6,)
    from lightning_memwatch.apps.models.diffusion import q_sample

    eps = model.denoiser(q_sample(x0, t, noise, model.alpha_bar), t)
    expected = ((eps - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(losses, expected, rtol=1e-6, atol=1e-7)


def test_ddpm_denoising_loss_uses_the_sampled_ema_weights():
    model = tiny_ddpm(ema_decay=0.9)
    with torch.no_grad():
        for p in model.denoiser.parameters():
            p.add_(0.5)  # raw and EMA weights now differ
    x0, t = TRAIN[:4], torch.tensor([10, 200, 600, 990])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    from lightning_memwatch.apps.models.diffusion import q_sample

    x_t = q_sample(x0, t, noise, model.alpha_bar)
    ema = ((model.ema_denoiser(x_t, t) - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(model.denoising_loss(x0, t, noise), ema, rtol=1e-6, atol=1e-7)


def test_probe_period_rule():
    assert probe_period(256, 512) == 50  # ceil(2 * 256 / (2 * 512 * 0.01))
    assert probe_period(256, 64) == 400
    assert probe_period(300, 64) == 469  # ceil(468.75)
    assert probe_period(1, 10_000) == 1
    assert probe_period(256, 64, budget=0.02) == 200
    assert band_names((1, 251, 501)) == ["t0001-0250", "t0251-0500"]
    with pytest.raises(ValueError, match="budget"):
        probe_period(256, 64, budget=0.0)


def test_loss_fn_with_the_wrong_shape_is_named():
    triples = draw_probe_triples(TRAIN, HELDOUT, num_triples=8)
    with pytest.raises(ValueError, match=r"per-sample loss.*\(8,\)"):
        measure_loss_gap(lambda x0, t, noise: x0.mean(), triples)


# -- the callback ---------------------------------------------------------------------------------------------
class Steps(Callback):
    """Records, after the probe, which steps carried a reading."""

    def __init__(self, probe):
        self.probe, self.seen = probe, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append((trainer.global_step, self.probe.latest.step if self.probe.latest else None))


def test_callback_reads_on_its_schedule_only_and_logs(tmp_path):
    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=24, every_n_train_steps=3)
    steps = Steps(probe)
    trainer = make_trainer(tmp_path, [probe, steps], max_steps=8)
    trainer.fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert [r.step for r in probe.history] == [0, 3, 6]
    assert all(latest <= step for step, latest in steps.seen)
    for key in (LOSS_GAP, PROBE_LOSS_TRAIN, f"{LOSS_GAP}/t0001-0250", f"{LOSS_GAP}/t0750-0999"):
        assert key in trainer.callback_metrics
    assert float(trainer.callback_metrics[LOSS_GAP]) == pytest.approx(probe.history[-1].gap, rel=1e-6)
    assert probe.history[0].loss_train > probe.history[-1].loss_train  # it trained
    assert probe.seconds > 0


def test_auto_period_follows_the_batch_size(tmp_path):
    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=6, budget=0.5)
    make_trainer(tmp_path, [probe], max_steps=5).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert probe.period == probe_period(6, 8, 0.5) == 2
    assert [r.step for r in probe.history] == [0, 2, 4]


def test_heldout_and_train_images_come_from_the_datamodule(tmp_path):
    import lightning as L

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return toy_loader(TRAIN, batch_size=8)

        def reference_images(self):
            return HELDOUT

    probe = LossGapProbe(num_triples=16, every_n_train_steps=2)
    make_trainer(tmp_path, [probe], max_steps=2).fit(tiny_ddpm(), datamodule=DM())
    assert probe.triples is not None
    assert torch.equal(probe.triples.heldout, HELDOUT[probe.triples.heldout_indices])
    assert len(probe.history) == 2


def test_train_images_come_from_the_loader_given_to_fit(tmp_path):
    probe = LossGapProbe(heldout_data=HELDOUT, num_triples=16, every_n_train_steps=2)
    make_trainer(tmp_path, [probe], max_steps=1).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert torch.equal(probe.triples.train, TRAIN[probe.triples.train_indices])  # the dataset's rows, unshuffled


def test_state_dict_round_trip_and_resume(tmp_path):
    full = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=16, every_n_train_steps=2)
    make_trainer(tmp_path / "a", [full], max_steps=8).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=32))

    first = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=16, every_n_train_steps=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    make_trainer(tmp_path / "b", [first, ckpt], max_steps=4).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=32))
    path = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))

    other = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=16, every_n_train_steps=2)
    other.load_state_dict(first.state_dict())
    assert other.state_dict()["history"] == first.state_dict()["history"]
    assert torch.equal(other.triples.noise, first.triples.noise)

    resumed = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=16, every_n_train_steps=2)
    make_trainer(tmp_path / "c", [resumed, ModelCheckpoint(dirpath=tmp_path / "c2")], max_steps=8).fit(
        tiny_ddpm(), toy_loader(TRAIN, batch_size=32), ckpt_path=str(path)
    )
    assert [r.step for r in resumed.history] == [0, 2, 4, 6, 8]  # step 4 is not read twice
    assert resumed.history[:3] == first.history  # restored, not re-measured
    assert torch.equal(resumed.triples.noise, full.triples.noise) and torch.equal(resumed.triples.t, full.triples.t)
    # the same triples and weights at the checkpoint (the diffusion noise after it is not checkpointed)
    assert [r.gap for r in first.history] == pytest.approx([r.gap for r in full.history[:3]], rel=1e-5, abs=1e-7)


# -- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -3, True, "often"])
def test_bad_period_is_refused(bad):
    with pytest.raises(ValueError, match="every_n_train_steps"):
        LossGapProbe(every_n_train_steps=bad)


def test_no_heldout_images_fails_at_setup(tmp_path):
    probe = LossGapProbe(train_data=TRAIN)
    with pytest.raises(ValueError, match="no held-out images.*heldout_data"):
        make_trainer(tmp_path, [probe]).fit(tiny_ddpm(), toy_loader(TRAIN))


def test_module_without_the_loss_method_fails_at_setup(tmp_path):
    class NoLoss(LightningModule):
        num_timesteps = 1000

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(64, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0].flatten(1)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN)
    with pytest.raises(AttributeError, match="denoising_loss") as err:
        make_trainer(tmp_path, [probe]).fit(NoLoss(), toy_loader(TRAIN))
    assert probe.history == [] and probe.triples is None  # at setup, before any step
    for option in (
        "def denoising_loss(self, x0, t, noise)",
        "MemWatch(sample_fn=adapter)",
        "sampler=adapter",
        "loss_fn=",
    ):
        assert option in str(err.value)
    # a MemWatch whose sample_fn has no loss does not count as one
    watch = never_evaluating_watch(lambda module, n, generator=None: torch.zeros(n, 1, 8, 8))
    with pytest.raises(AttributeError, match="no MemWatch samples with an adapter"):
        make_trainer(tmp_path, [watch, LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN)]).fit(
            NoLoss(), toy_loader(TRAIN)
        )
    # loss_fn= is the way out, and num_timesteps can be given too
    probe = LossGapProbe(
        heldout_data=HELDOUT,
        train_data=TRAIN,
        num_triples=8,
        every_n_train_steps=1,
        num_timesteps=50,
        loss_fn=lambda module, x0, t, noise: module.layer(x0.flatten(1)).squeeze(1) ** 2,
    )
    make_trainer(tmp_path, [probe], max_steps=2).fit(NoLoss(), toy_loader(TRAIN))
    assert len(probe.history) == 3 and int(probe.triples.t.max()) < 50


class LossAdapter:
    """A ``sample_fn`` adapter with the loss part of the contract, around a DDPM it does not own (T = 600)."""

    def __init__(self, scale: float = 1.0, num_timesteps: int = 600) -> None:
        self.scale, self.T, self.calls = scale, num_timesteps, 0

    def __call__(self, pl_module, num_samples, generator=None, noise=None):
        return pl_module.sample(num_samples, generator=generator, noise=noise)

    def denoising_loss(self, pl_module, x0, t, noise):
        self.calls += 1
        return self.scale * pl_module.denoising_loss(x0, t, noise)

    def num_timesteps(self, pl_module):
        return self.T


def never_evaluating_watch(sample_fn, num_samples: int = 4) -> MemWatch:
    return MemWatch(
        train_data=TRAIN,
        num_samples=num_samples,
        schedule=[10_000],
        sample_fn=sample_fn,
        bootstrap=10,
        log_images=False,
        verbose=False,
    )


def test_the_loss_of_memwatchs_adapter_is_found_with_its_timesteps(tmp_path):
    adapter = LossAdapter(scale=2.0)
    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=12, every_n_train_steps=2)
    trainer = make_trainer(tmp_path, [never_evaluating_watch(adapter), probe], max_steps=2)
    trainer.fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert adapter.calls > 0 and int(probe.triples.t.max()) < 600 and probe.triples.edges[-1] == 600
    assert [r.step for r in probe.history] == [0, 2] and LOSS_GAP in trainer.callback_metrics
    module_only = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=12, every_n_train_steps=2)
    make_trainer(tmp_path, [module_only], max_steps=2).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert module_only.triples.edges[-1] == 1000  # no MemWatch adapter: the module's method and T


def test_sampler_argument_and_loss_fn_take_precedence(tmp_path):
    first, second = LossAdapter(scale=2.0), LossAdapter(scale=3.0, num_timesteps=400)
    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=12, every_n_train_steps=1, sampler=second)
    make_trainer(tmp_path, [never_evaluating_watch(first), probe], max_steps=1).fit(
        tiny_ddpm(), toy_loader(TRAIN, batch_size=8)
    )
    assert second.calls > 0 and first.calls == 0 and probe.triples.edges[-1] == 400
    # the reading is the adapter's loss (3x the module's) on the probe's triples
    model = tiny_ddpm()
    expected = measure_loss_gap(lambda x0, t, noise: 3.0 * model.eval().denoising_loss(x0, t, noise), probe.triples)
    assert probe.history[0].loss_train == pytest.approx(expected.loss_train, rel=1e-5)

    override = LossGapProbe(
        heldout_data=HELDOUT,
        train_data=TRAIN,
        num_triples=12,
        every_n_train_steps=1,
        sampler=second,
        loss_fn=lambda module, x0, t, noise: module.denoising_loss(x0, t, noise),
    )
    second.calls = 0
    make_trainer(tmp_path, [override], max_steps=1).fit(tiny_ddpm(), toy_loader(TRAIN, batch_size=8))
    assert second.calls == 0 and override.triples.edges[-1] == 1000  # loss_fn wins; T from the module


def test_two_memwatch_adapters_are_ambiguous_at_setup(tmp_path):
    probe = LossGapProbe(heldout_data=HELDOUT, train_data=TRAIN, num_triples=8)
    callbacks = [never_evaluating_watch(LossAdapter()), never_evaluating_watch(LossAdapter(), num_samples=6), probe]
    with pytest.raises(ValueError, match=r"LossGapProbe\(sampler=\.\.\.\)"):
        make_trainer(tmp_path, callbacks).fit(tiny_ddpm(), toy_loader(TRAIN))


def test_a_sampler_without_the_loss_is_refused_at_construction():
    with pytest.raises(TypeError, match="denoising_loss.*num_timesteps.*loss_fn"):
        LossGapProbe(sampler=lambda module, n, generator=None: module.sample(n, generator=generator))


def test_ddp_two_ranks_give_one_reading_on_every_rank(tmp_path):
    script = Path(__file__).with_name("_ddp_probe.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for devices in (1, 2):
        subprocess.run(
            [sys.executable, str(script), str(tmp_path / f"d{devices}"), str(devices)],
            check=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
    single = json.loads((tmp_path / "d1" / "rank0.json").read_text())
    rank0 = json.loads((tmp_path / "d2" / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "d2" / "rank1.json").read_text())
    assert [r["step"] for r in rank0] == [r["step"] for r in single] == [0, 4, 8]
    assert [r["gap"] for r in rank0] == [r["gap"] for r in rank1]  # the same value on every rank
    # step 0 (same weights): the shares add up to the single process's sum, up to float summation order
    assert rank0[0]["gap"] == pytest.approx(single[0]["gap"], rel=1e-5, abs=1e-7)
    assert rank0[0]["loss_train"] == pytest.approx(single[0]["loss_train"], rel=1e-5)


def test_loader_and_iterable_sources_give_the_triples_of_their_images():
    from torch.utils.data import DataLoader, IterableDataset, SubsetRandomSampler, TensorDataset

    class Stream(IterableDataset):  # a stream with a length: read whole (it has no rows to pick)
        def __iter__(self):
            return iter(HELDOUT)

        def __len__(self):
            return len(HELDOUT)

    split = [30, 2, 17, 5, 11, 8, 23]  # a loader that draws only these rows of its dataset
    loader = DataLoader(TensorDataset(TRAIN.repeat(2, 1, 1, 1)), batch_size=3, sampler=SubsetRandomSampler(split))
    triples = draw_probe_triples(loader, Stream(), num_triples=20, seed=4)
    expected = draw_probe_triples(TRAIN.repeat(2, 1, 1, 1)[sorted(split)], HELDOUT, num_triples=20, seed=4)
    assert torch.equal(triples.train, expected.train) and torch.equal(triples.heldout, expected.heldout)
    assert torch.equal(triples.train_indices, expected.train_indices)
    with pytest.raises(ValueError, match="NaN/Inf values"):
        draw_probe_triples(TRAIN, torch.full_like(HELDOUT, float("nan")), num_triples=4)

"""EMA with a warm-up (lightning_memwatch.weights): until Lightning's averaging callback has updated its average
once, MemWatch scores the raw weights and says so; it never keeps or restores a never-updated average; and after
a resume mid-run the weights restored at the end are exactly the ones scored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
from lightning_memwatch.weights import RAW_WARMUP, ModuleEMA, resolve_weights

TRAIN = torch.rand((48, 1, 6, 6), generator=torch.Generator().manual_seed(0)) * 2 - 1
QUALITY = {5: 10.0, 10: 5.0, 15: 1.05, 20: 1.0, 25: 0.95, 30: 1.02, 35: 0.99, 40: 0.5, 45: 0.4, 50: 0.3}
START = 12  # EMAWeightAveraging(update_starting_at_step=START): first update at global_step START + 1


class CopyingToy(LightningModule):
    """A linear layer trained by SGD; samples copies of training images from step 40 on."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("train_images", TRAIN.clone())
        self.layer = torch.nn.Linear(TRAIN[0].numel(), 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def sample(self, num_samples, generator=None, noise=None):
        if self.global_step < 40:
            return torch.sign(noise) * 0.999
        pick = (noise.flatten(1)[:, 0].abs() * 1e4).long() % len(self.train_images)
        return self.train_images[pick].clone()


class RawWeights(Callback):
    """Keeps the module's raw weights at every step (placed before MemWatch: nothing swapped in yet)."""

    def __init__(self) -> None:
        self.raw: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw[trainer.global_step] = _copy(pl_module)


def _copy(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loader():
    data = torch.utils.data.TensorDataset(TRAIN, torch.zeros(len(TRAIN)))
    # a fixed order, so a resumed run sees the batches of the uninterrupted one
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _parts(model, tmp_path, verbose=False):
    watch = MemWatch(
        train_data=TRAIN, num_samples=24, sample_batch_size=12, schedule=EvalSchedule.every(5), bootstrap=100,
        verbose=verbose, log_images=False, metrics={"quality": lambda generated: QUALITY[model.global_step]},
        detector=TimescaleDetector(quality_key="quality", floor=1.0),
    )  # fmt: skip
    scored: dict[int, dict[str, torch.Tensor]] = {}
    watch.add_listener(lambda trainer, pl_module, record: scored.setdefault(record.step, _copy(pl_module)))
    stopper = MemorizationEarlyStopping(watch, dirpath=str(tmp_path / "best"))
    return watch, stopper, scored


def _trainer(tmp_path, callbacks, max_steps=100):
    return Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=False, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
    )  # fmt: skip


def test_before_the_first_update_the_raw_weights_are_scored_and_said(tmp_path, caplog):
    torch.manual_seed(0)
    model = CopyingToy()
    initial = _copy(model)
    watch, stopper, scored = _parts(model, tmp_path, verbose=True)
    raw = RawWeights()
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=START)
    with caplog.at_level("INFO"):
        _trainer(tmp_path, [ema, raw, watch, stopper]).fit(model, _loader())
    used = {r.step: r.scored_weights for r in watch.history}
    assert used[5] == used[10] == RAW_WARMUP and used[15] == used[20] == "averaged"
    for step in (5, 10):  # the raw weights of that step, not the average's initial weights
        assert _same(scored[step], raw.raw[step]) and not _same(scored[step], initial)
    assert not _same(scored[15], raw.raw[15])  # the average from its first update on
    log = caplog.text
    assert "raw weights scored: EMAWeightAveraging has not updated its average yet (update_starting_at_step=12)" in log
    assert "are scored from here on" in log and "raw weights (the average is not updated yet)" in log
    assert _same(model.state_dict(), scored[stopper.restored_step])  # restored: exactly the scored weights


@pytest.mark.parametrize("start", [START, 27])
def test_after_a_resume_under_ema_the_restored_weights_are_the_scored_ones(tmp_path, start):
    """Resumed at step 30 from a checkpoint holding the average and the raw weights; the best weights are those
    of step 25: the average's (start 12) or, inside the warm-up (start 27), the raw weights of step 25."""
    torch.manual_seed(0)
    full_model = CopyingToy()
    start_weights = _copy(full_model)
    watch, stopper, full_scored = _parts(full_model, tmp_path / "full")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    raw = RawWeights()
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=start)
    _trainer(tmp_path / "full", [ema, raw, watch, stopper, ckpt]).fit(full_model, _loader())
    assert stopper.restored_step == 25 and watch.tau_mem == 40
    assert _same(full_model.state_dict(), full_scored[25])

    resumed_model = CopyingToy()
    resumed_model.load_state_dict(start_weights)
    watch2, stopper2, scored2 = _parts(resumed_model, tmp_path / "resumed")
    ema2 = EMAWeightAveraging(decay=0.5, update_starting_at_step=start)
    _trainer(tmp_path / "resumed", [ema2, watch2, stopper2]).fit(
        resumed_model, _loader(), ckpt_path=str(tmp_path / "ckpt" / "epoch=4-step=30.ckpt")
    )
    assert sorted(scored2) == [35, 40]  # evaluated after the resume only
    assert [r.step for r in watch2.history] == [r.step for r in watch.history]
    assert stopper2.restored_step == 25
    assert _same(scored2[35], full_scored[35]) and _same(scored2[40], full_scored[40])
    assert _same(resumed_model.state_dict(), full_scored[25])  # the weights scored at step 25, before the resume
    # never the initial weights of a never-updated average: the average's, or in its warm-up the raw ones
    assert not _same(full_scored[25], start_weights)
    assert _same(full_scored[25], raw.raw[25]) == (start > 25)


def test_module_ema_held_as_an_averaged_model_is_scored_once_updated():
    module = torch.nn.Module()
    module.layer = torch.nn.Linear(3, 1)
    module.ema = torch.optim.swa_utils.AveragedModel(module.layer)
    with torch.no_grad():
        module.layer.weight.fill_(1.0)
        module.ema.module.weight.fill_(2.0)  # never updated: the copy of the initial weights
    scored = resolve_weights(ModuleEMA("ema", target="layer"), SimpleNamespace(callbacks=[]), module)
    assert scored.in_use(module) == RAW_WARMUP
    with scored.applied(None, module):
        assert float(module.layer.weight.detach().unique()) == 1.0  # raw weights scored
    module.ema.update_parameters(module.layer)
    assert scored.in_use(module) == "module_ema"


def test_a_fit_that_ends_inside_the_warmup_says_fit_returns_the_initial_weights(tmp_path):
    """Lightning's averaging callback copies its average into the module at the end of fit even when it was
    never updated: MemWatch scored the raw weights, and warns that fit hands back the initial weights."""
    import warnings

    torch.manual_seed(0)
    model = CopyingToy()
    watch, _, scored = _parts(model, tmp_path)
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [ema, watch], max_steps=10).fit(model, _loader())
    assert [r.scored_weights for r in watch.history] == [RAW_WARMUP, RAW_WARMUP]
    assert any("never-updated average, the initial weights" in str(w.message) for w in caught)

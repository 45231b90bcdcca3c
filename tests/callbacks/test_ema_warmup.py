"""EMA with a warm-up (lightning_memwatch.weights): until Lightning's averaging callback has updated its average
once, MemWatch scores the raw weights and says so; it never keeps or restores a never-updated average; and after
a resume mid-run the weights restored at the end are exactly the ones scored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from _kill_resume_fit import QUALITY, TRAIN, CopyingToy  # samples copies from step 40 on
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
from lightning_memwatch.weights import RAW_WARMUP, ModuleEMA, resolve_weights

START = 12  # EMAWeightAveraging(update_starting_at_step=START): first update at global_step START + 1


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


def _parts(model, tmp_path, verbose=False, schedule=None, weights="auto"):
    watch = MemWatch(
        train_data=TRAIN, num_samples=24, sample_batch_size=12, schedule=schedule or EvalSchedule.every(5),
        bootstrap=100, weights=weights, verbose=verbose, log_images=False,
        metrics={"quality": lambda generated: QUALITY[model.global_step]},
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


@pytest.mark.parametrize("start", [START, 27, 1000])
def test_after_a_resume_under_ema_the_restored_weights_are_the_scored_ones(tmp_path, start):
    """Resumed at step 30 from a checkpoint holding the average and the raw weights; the best weights are those
    of step 25: the average's (start 12) or, inside the warm-up (start 27), the raw weights of step 25; with
    start 1000 the average is never updated, before or after the resume, and fit still returns them."""
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


@pytest.mark.parametrize("ema_first", [True, False])
def test_a_stop_inside_the_warmup_hands_back_the_kept_raw_weights(tmp_path, ema_first):
    """The average is never updated (its warm-up outlasts the fit): the stopper keeps the raw weights of step 25
    and stops at tau_mem = 40; fit returns those weights, whichever on_train_end runs first (Lightning's
    averaging callback copies its average into the module there)."""
    torch.manual_seed(0)
    model = CopyingToy()
    initial = _copy(model)
    watch, stopper, scored = _parts(model, tmp_path)
    raw = RawWeights()
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=1000)
    callbacks = [ema, raw, watch, stopper] if ema_first else [raw, watch, stopper, ema]
    _trainer(tmp_path, callbacks).fit(model, _loader())
    assert watch.tau_mem == 40 and stopper.restored_step == 25
    assert {r.scored_weights for r in watch.history} == {RAW_WARMUP}
    assert _same(model.state_dict(), scored[25]) and _same(scored[25], raw.raw[25])
    assert not _same(model.state_dict(), initial)


@pytest.mark.parametrize("ema_first", [True, False])
def test_a_stop_inside_the_warmup_with_nothing_kept_hands_back_the_last_scored_weights(tmp_path, ema_first):
    """The zoo's diffusers-ema-warmup case: the first evaluation (step 40) already copies, so the stopper keeps
    nothing and stops there; fit returns the raw weights scored at step 40, never the initial weights."""
    torch.manual_seed(0)
    model = CopyingToy()
    initial = _copy(model)
    watch, stopper, scored = _parts(model, tmp_path, schedule=EvalSchedule.at([40, 80]))
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=1000)
    callbacks = [ema, watch, stopper] if ema_first else [watch, stopper, ema]
    _trainer(tmp_path, callbacks).fit(model, _loader())
    assert watch.tau_mem == 40 and stopper.best_step is None and stopper.stopped_step == 40
    assert [r.scored_weights for r in watch.history] == [RAW_WARMUP]
    assert _same(model.state_dict(), scored[40]) and not _same(model.state_dict(), initial)


@pytest.mark.parametrize("ema_first", [True, False])
def test_a_fit_that_ends_inside_the_warmup_returns_the_raw_weights(tmp_path, ema_first):
    """max_steps inside the warm-up, no stopper: fit returns the raw weights MemWatch scored last (step 10),
    not the initial weights that Lightning's averaging callback would copy from its never-updated average."""
    torch.manual_seed(0)
    model = CopyingToy()
    initial = _copy(model)
    watch, _, scored = _parts(model, tmp_path)
    ema = EMAWeightAveraging(decay=0.5, update_starting_at_step=1000)
    callbacks = [ema, watch] if ema_first else [watch, ema]
    _trainer(tmp_path, callbacks, max_steps=10).fit(model, _loader())
    assert [r.scored_weights for r in watch.history] == [RAW_WARMUP, RAW_WARMUP]
    assert _same(model.state_dict(), scored[10]) and not _same(model.state_dict(), initial)


@pytest.mark.parametrize("ema_first", [True, False])
def test_raw_weights_beside_an_average_are_restored_as_kept(tmp_path, ema_first):
    """MemWatch(weights="raw") beside an updated EMAWeightAveraging: the stopper keeps the raw weights of step
    25, and fit returns them, not the average that the callback copies into the module when training ends."""
    torch.manual_seed(0)
    model = CopyingToy()
    watch, stopper, scored = _parts(model, tmp_path, weights="raw")
    raw = RawWeights()
    ema = EMAWeightAveraging(decay=0.5)
    callbacks = [ema, raw, watch, stopper] if ema_first else [raw, watch, stopper, ema]
    _trainer(tmp_path, callbacks).fit(model, _loader())
    assert stopper.restored_step == 25 and {r.scored_weights for r in watch.history} == {"raw"}
    assert _same(scored[25], raw.raw[25]) and _same(model.state_dict(), scored[25])


def test_a_fit_ending_without_an_epoch_end_hands_back_or_warns():
    """on_train_end without the last epoch's end (the hand-back's usual place): MemWatch placed before the
    averaging callback still hands the raw weights back; placed after it, the initial weights are already in
    the module, and it says so."""
    import warnings

    torch.manual_seed(0)
    model = CopyingToy()
    initial = _copy(model)
    for order in ("watch_first", "ema_first"):
        model.load_state_dict(initial)
        ema = EMAWeightAveraging(update_starting_at_step=1000)
        ema.setup(SimpleNamespace(), model, "fit")  # the average: a copy of the initial weights, never updated
        with torch.no_grad():
            model.layer.weight.add_(1.0)  # "trained"
        trained = _copy(model)
        watch = MemWatch(train_data=TRAIN, log_images=False)
        callbacks = [watch, ema] if order == "watch_first" else [ema, watch]
        trainer = SimpleNamespace(callbacks=callbacks, global_step=7)
        watch.scored_weights = resolve_weights("auto", trainer, model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for callback in callbacks:  # Lightning's order: the Trainer's callbacks in turn
                callback.on_train_end(trainer, model)
        said = any("has copied its never-updated average, the initial weights" in str(w.message) for w in caught)
        if order == "watch_first":
            assert _same(model.state_dict(), trained) and not said
        else:
            assert _same(model.state_dict(), initial) and said

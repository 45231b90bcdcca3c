"""MemorizationEarlyStopping: unit tests driven by a scripted watch, then real Trainer runs with MemWatch."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_memwatch.callbacks.early_stopping import (
    BEST_FILENAME,
    MemorizationEarlyStopping,
    MemorizationStoppingReason,
)
from lightning_memwatch.detection import TimescaleDetector

torch.set_num_threads(1)


# -- a scripted stand-in for MemWatch -------------------------------------------------------------------
class ScriptedWatch:
    """What MemorizationEarlyStopping needs of MemWatch (its WatchLike): history, detector, record_keys,
    scored_weights, add_listener, add_event_listener."""

    record_keys = None  # not announced: the monitor is checked at the first record
    scored_weights = None  # the weights in the module

    def __init__(self, detector: TimescaleDetector | None = None) -> None:
        self.detector = detector if detector is not None else TimescaleDetector()
        self.history: list[dict] = []
        self.listeners: list = []
        self.event_listeners: list = []

    def add_listener(self, fn) -> None:
        if fn not in self.listeners:
            self.listeners.append(fn)

    def add_event_listener(self, fn) -> None:
        if fn not in self.event_listeners:
            self.event_listeners.append(fn)

    @property
    def tau_gen(self):
        return None if self.detector.tau_gen is None else self.detector.tau_gen.step

    @property
    def tau_mem(self):
        return None if self.detector.tau_mem is None else self.detector.tau_mem.step

    def evaluate(self, trainer, pl_module, record: dict) -> None:
        self.history.append(record)
        for event in self.detector.update(record):  # events first, then the record, as MemWatch does
            for fn in self.event_listeners:
                fn(trainer, pl_module, event)
        for fn in self.listeners:
            fn(trainer, pl_module, record)


class FakeStrategy:
    def __init__(self, other_ranks_stop: bool = False) -> None:
        self.other_ranks_stop = other_ranks_stop
        self.calls: list[tuple[bool, bool]] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:  # noqa: A002 (Lightning's name)
        self.calls.append((decision, all))
        return decision or self.other_ranks_stop if not all else decision and not self.other_ranks_stop

    def barrier(self, name=None) -> None:
        pass


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)


def make(watch=None, other_ranks_stop=False, **kwargs):
    watch = watch if watch is not None else ScriptedWatch(TimescaleDetector(floor=20.0))
    stopper = MemorizationEarlyStopping(watch, **kwargs)
    trainer = SimpleNamespace(
        callbacks=[watch, stopper], strategy=FakeStrategy(other_ranks_stop), should_stop=False,
        is_global_zero=True, global_step=0,
    )
    module = Tiny()
    stopper.setup(trainer, module, "fit")
    return watch, stopper, trainer, module


def rec(step, fid, ci_low=0.0, **extra):
    base = {"step": step, "f_mem": ci_low, "f_mem_ci_low": ci_low, "f_mem_ci_high": ci_low, "fid": fid}
    return base | extra


def train(watch, stopper, trainer, module, history, end=True):
    """Feed records as a Trainer would: weights = the step (to recognise them), stop when asked."""
    for record in history:
        trainer.global_step = record["step"]
        module.layer.weight.data.fill_(float(record["step"]))
        watch.evaluate(trainer, module, record)
        if trainer.should_stop:
            break
    if end:
        stopper.on_train_end(trainer, module)


def weights_step(module) -> float:
    values = module.layer.weight.detach().unique()
    assert len(values) == 1
    return float(values)


# floor 20, eps 0.1 -> tau_gen at the first FID <= 22 (step 30); memorization from step 70, with great FIDs
FLOOR_RUN = [
    rec(10, 300.0), rec(20, 100.0), rec(30, 21.5), rec(40, 20.8), rec(50, 21.2), rec(60, 20.9),
    rec(70, 18.0, 0.3), rec(80, 17.0, 0.5), rec(90, 16.0, 0.7),
]


def test_stops_at_the_evaluation_where_fmem_jumps_and_restores_the_best_in_window_weights():
    watch, stopper, trainer, module = make()
    train(watch, stopper, trainer, module, FLOOR_RUN)
    assert trainer.should_stop and trainer.global_step == 70
    assert stopper.stopped_step == 70 and watch.tau_mem == 70 and watch.tau_gen == 30
    assert stopper.stopping_reason is MemorizationStoppingReason.MEMORIZATION is stopper.stop_reason
    assert "tau_mem = 70" in stopper.stopping_reason_message and "step 40" in stopper.stopping_reason_message
    # memorized copies have the best FIDs (18 at step 70); the kept weights are the in-window best (20.8)
    assert (stopper.best_step, stopper.best_score) == (40, 20.8)
    assert weights_step(module) == 40.0 and stopper.restored_step == 40
    # one reduced decision per evaluation, "any rank stops all"
    assert trainer.strategy.calls == [(False, False)] * 6 + [(True, False)]


def test_the_best_pre_onset_evaluation_is_kept_and_unconfirmed_memorization_never():
    # plateau rule: tau_gen at step 800; step 400 has the lowest FID before the onset, steps 1000-1100 memorize
    # with low FIDs, but tau_mem (detector patience 3) is confirmed only at 1200, dated 1000
    fids = [300.0, 100.0, 25.0, 20.0, 22.0, 21.5, 21.8, 21.0, 20.5, 15.0, 14.0, 13.0]
    ci = [0.0] * 9 + [0.1, 0.2, 0.3]
    history = [rec(100 * (i + 1), f, c) for i, (f, c) in enumerate(zip(fids, ci, strict=True))]
    watch, stopper, trainer, module = make(ScriptedWatch(TimescaleDetector(patience=3)))
    train(watch, stopper, trainer, module, history)
    assert watch.tau_gen == 400 and watch.detector.tau_gen.confirmed_step == 800 and watch.tau_mem == 1000
    assert watch.detector.tau_mem.confirmed_step == 1200 and stopper.stopped_step == 1200
    # the best quality before the onset, although it came before tau_gen; never 1000-1100 (after the onset)
    assert (stopper.best_step, stopper.best_score) == (400, 20.0)
    assert weights_step(module) == 400.0


def test_stopper_patience_is_deprecated_and_lives_in_the_detector():
    later = [(70, 18.0, 0.3), (80, 17.0, 0.0), (90, 16.0, 0.2), (100, 15.0, 0.4), (110, 14.0, 0.6)]
    history = FLOOR_RUN[:6] + [rec(*args) for args in later]
    removal = r"removed in lightning-memwatch 0\.3\.0"
    with pytest.warns(DeprecationWarning, match=removal + r".*TimescaleDetector\(patience=2\)"):
        watch, stopper, trainer, module = make(patience=2)
    assert watch.detector.patience == 2 == stopper.patience
    train(watch, stopper, trainer, module, history)
    # one counter, the detector's: the blip at 80 breaks the run, which restarts at 90 and is confirmed at 100
    assert watch.tau_mem == 90 and watch.detector.tau_mem.confirmed_step == 100
    assert stopper.stopped_step == 100 and trainer.global_step == 100 and stopper.wait_count == 2
    # 80 comes before the onset and its f_mem is not significant: the best pre-onset quality (17.0)
    assert stopper.best_step == 80 and weights_step(module) == 80.0
    for patience in (0, 1):
        watch, stopper, trainer, module = make(patience=patience)
        train(watch, stopper, trainer, module, history)
        assert stopper.stopped_step == 70 and stopper.best_step == 40


def test_a_record_without_fmem_neither_extends_nor_breaks_the_count():
    no_fmem = {"step": 75, "fid": 17.5}
    history = FLOOR_RUN[:7] + [no_fmem, rec(80, 17.0, 0.5)]
    watch, stopper, trainer, module = make(patience=2)
    train(watch, stopper, trainer, module, history)
    assert stopper.stopped_step == 80 and stopper.wait_count == 2


def test_never_memorizing_run_is_not_stopped_and_keeps_its_final_weights():
    history = [r for r in FLOOR_RUN if r["f_mem"] == 0.0]
    watch, stopper, trainer, module = make()
    train(watch, stopper, trainer, module, history)
    assert not trainer.should_stop and stopper.stopped_step is None
    assert stopper.stopping_reason is MemorizationStoppingReason.NOT_STOPPED
    assert stopper.best_step == 40 and stopper.restored_step is None
    assert weights_step(module) == 60.0


def test_copying_from_the_first_evaluation_warns_and_keeps_the_weights():
    history = [rec(10, 300.0, 0.1), rec(20, 100.0, 0.2), rec(30, 21.0, 0.4)]
    watch, stopper, trainer, module = make()
    with pytest.warns(UserWarning, match="no evaluation before the memorization onset"):
        train(watch, stopper, trainer, module, history)
    assert stopper.stopped_step == 10 and stopper.best_step is None and weights_step(module) == 10.0


def test_strict_requires_the_quality_signal():
    history = [rec(10, None), rec(20, None), rec(30, None, 0.5)]
    watch, stopper, trainer, module = make(ScriptedWatch())
    with pytest.raises(RuntimeError, match=r"`fid`.*MemWatch\(fid=FID\(...\)\).*strict=False.*`f_mem`"):
        train(watch, stopper, trainer, module, history)
    watch, stopper, trainer, module = make(ScriptedWatch(), strict=False)
    with pytest.warns(RuntimeWarning, match="`fid`"):
        train(watch, stopper, trainer, module, history, end=False)
    assert stopper.stopped_step == 30  # still stops at tau_mem
    # no quality signal: the latest evaluation before the onset is kept and restored
    assert "latest evaluation before the onset" in stopper.stopping_reason_message
    stopper.on_train_end(trainer, module)
    assert stopper.restored_step == 20 and stopper.best_score is None and weights_step(module) == 20.0


def test_a_user_quality_metric_and_max_mode_come_from_the_detector():
    detector = TimescaleDetector(quality_key="score", quality_mode="max", floor=10.0)
    history = [rec(10, None, score=1.0), rec(20, None, score=9.5), rec(30, None, score=9.8),
               rec(40, None, score=9.6), rec(50, None, 0.2, score=12.0)]
    watch, stopper, trainer, module = make(ScriptedWatch(detector))
    assert (stopper.monitor, stopper.mode) == ("score", "max")
    assert stopper.state_key == "MemorizationEarlyStopping{'monitor': 'score', 'mode': 'max'}"
    train(watch, stopper, trainer, module, history)
    assert (stopper.best_step, stopper.best_score, stopper.stopped_step) == (30, 9.8, 50)
    assert weights_step(module) == 30.0


def test_any_rank_stopping_stops_this_one():
    watch, stopper, trainer, module = make(other_ranks_stop=True)
    train(watch, stopper, trainer, module, FLOOR_RUN[:2], end=False)
    assert trainer.should_stop and stopper.stopped_step == 10
    assert stopper.stopping_reason is MemorizationStoppingReason.MEMORIZATION
    assert "another rank" in stopper.stopping_reason_message


def test_dirpath_keeps_the_best_weights_in_a_file(tmp_path):
    watch, stopper, trainer, module = make(dirpath=tmp_path / "best")
    train(watch, stopper, trainer, module, FLOOR_RUN, end=False)
    path = tmp_path / "best" / BEST_FILENAME
    assert stopper.best_model_path == str(path) and stopper.best_weights is None
    saved = torch.load(path, weights_only=True)
    assert (saved["step"], saved["score"], saved["monitor"]) == (40, 20.8, "fid")
    assert float(saved["state_dict"]["layer.weight"].unique()) == 40.0
    assert not list(path.parent.glob("*.tmp"))
    stopper.on_train_end(trainer, module)
    assert weights_step(module) == 40.0


def test_restore_best_off_tracks_the_best_step_without_copying_weights():
    watch, stopper, trainer, module = make(restore_best=False)
    train(watch, stopper, trainer, module, FLOOR_RUN)
    assert stopper.best_step == 40 and stopper.best_weights is None
    assert stopper.stopped_step == 70 and weights_step(module) == 70.0


def test_kept_weights_are_copies_on_cpu():
    watch, stopper, trainer, module = make()
    train(watch, stopper, trainer, module, FLOOR_RUN[:4], end=False)
    kept = stopper.best_weights
    module.layer.weight.data.fill_(-1.0)
    assert float(kept["layer.weight"].unique()) == 40.0 and kept["layer.weight"].device.type == "cpu"


@pytest.mark.parametrize("split", range(len(FLOOR_RUN)))
def test_state_dict_round_trip_resumes_to_the_same_result(tmp_path, split):
    watch, stopper, trainer, module = make()
    train(watch, stopper, trainer, module, FLOOR_RUN[:split], end=False)
    torch.save({"stopper": stopper.state_dict(), "detector": watch.detector.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)

    detector = TimescaleDetector(floor=20.0)
    detector.load_state_dict(state["detector"])
    watch2, stopper2, trainer2, module2 = make(ScriptedWatch(detector))
    watch2.history = list(watch.history)  # the watch's own history is restored with it
    stopper2.load_state_dict(state["stopper"])
    assert stopper2.state_dict().keys() == stopper.state_dict().keys()
    train(watch2, stopper2, trainer2, module2, FLOOR_RUN[split:])
    assert (stopper2.best_step, stopper2.best_score, stopper2.stopped_step) == (40, 20.8, 70)
    assert weights_step(module2) == 40.0


def test_bad_arguments_name_the_fix():
    watch = ScriptedWatch()
    with pytest.raises(TypeError, match="MemWatch"):
        MemorizationEarlyStopping(object())
    with pytest.raises(MisconfigurationException, match="patience"):
        MemorizationEarlyStopping(watch, patience=-1)
    with pytest.raises(MisconfigurationException, match="'min', 'max'"):
        MemorizationEarlyStopping(watch, mode="lower")
    stopper = MemorizationEarlyStopping(watch)
    trainer = SimpleNamespace(callbacks=[stopper], strategy=FakeStrategy())
    with pytest.raises(MisconfigurationException, match=r"Trainer\(callbacks=\[watch, "):
        stopper.setup(trainer, Tiny(), "fit")
    stopper.setup(trainer, Tiny(), "validate")  # other stages: nothing to check, nothing registered
    assert watch.listeners == []


def test_setup_registers_one_listener_even_when_called_twice():
    watch, stopper, trainer, module = make()
    stopper.setup(trainer, module, "fit")
    assert len(watch.listeners) == 1


def test_verbose_messages(caplog):
    watch, stopper, trainer, module = make(verbose=True)
    with caplog.at_level(logging.INFO):
        train(watch, stopper, trainer, module, FLOOR_RUN)
    text = caplog.text
    assert "kept the weights of step 40 (fid = 20.8 (was 21.5))" in text
    assert "Memorization detected" in text and "restored the weights of step 40" in text


# -- real Trainer runs with MemWatch ----------------------------------------------------------------------
# A toy whose samples are far from the training images before MEMORIZE_FROM optimizer steps and exact copies
# after; its quality (a fake FID read from QUALITY by step) reaches the floor 1.0 at step 15, is best at 25.
MEMORIZE_FROM = 40
QUALITY = {5: 10.0, 10: 5.0, 15: 1.05, 20: 1.0, 25: 0.95, 30: 1.02, 35: 0.99, 40: 0.5, 45: 0.4, 50: 0.3}
TRAIN_IMAGES = torch.rand((48, 1, 6, 6), generator=torch.Generator().manual_seed(0)) * 2 - 1


class CopyingToy(LightningModule):
    def __init__(self, memorize_from: int = MEMORIZE_FROM) -> None:
        super().__init__()
        self.register_buffer("train_images", TRAIN_IMAGES.clone())
        self.layer = torch.nn.Linear(TRAIN_IMAGES[0].numel(), 1)
        self.memorize_from = memorize_from

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def sample(self, num_samples, generator=None, noise=None):
        if self.global_step < self.memorize_from:
            return torch.sign(noise) * 0.999  # about equally far from every training image: ratio ~ 1
        pick = (noise.flatten(1)[:, 0].abs() * 1e4).long() % len(self.train_images)
        return self.train_images[pick].clone()


def loader():
    data = torch.utils.data.TensorDataset(TRAIN_IMAGES, torch.zeros(len(TRAIN_IMAGES)))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)


def real_watch(model):
    from lightning_memwatch import EvalSchedule, MemWatch

    return MemWatch(
        num_samples=24, sample_batch_size=12, schedule=EvalSchedule.every(5), bootstrap=100, verbose=False,
        log_images=False, metrics={"quality": lambda generated: QUALITY[model.global_step]},
        detector=TimescaleDetector(quality_key="quality", floor=1.0),
    )


def snapshot_listener(store):
    def listener(trainer, pl_module, record):
        store[record["step"]] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    return listener


def fit(tmp_path, model, watch, stopper, max_steps=100, ckpt_path=None, extra=(), **kwargs):
    from lightning.pytorch import Trainer

    trainer = Trainer(
        max_steps=max_steps, callbacks=[watch, stopper, *extra], logger=False, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        enable_checkpointing=bool(extra), **kwargs,
    )
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def test_trainer_stops_at_the_jump_and_ends_with_the_best_in_window_weights(tmp_path):
    model = CopyingToy()
    watch, snapshots = real_watch(model), {}
    watch.add_listener(snapshot_listener(snapshots))
    stopper = MemorizationEarlyStopping(watch)
    trainer = fit(tmp_path, model, watch, stopper)
    assert [r["f_mem"] for r in watch.history] == [0.0] * 7 + [1.0]
    assert trainer.global_step == MEMORIZE_FROM and watch.history[-1]["step"] == MEMORIZE_FROM
    assert stopper.stopped_step == MEMORIZE_FROM and watch.tau_mem == MEMORIZE_FROM and watch.tau_gen == 15
    assert (stopper.best_step, stopper.best_score) == (25, 0.95)
    assert same_weights(model.state_dict(), snapshots[25])
    assert not same_weights(snapshots[25], snapshots[MEMORIZE_FROM])


def test_trainer_min_steps_is_honoured(tmp_path):
    model = CopyingToy()
    watch, snapshots = real_watch(model), {}
    watch.add_listener(snapshot_listener(snapshots))
    stopper = MemorizationEarlyStopping(watch)
    trainer = fit(tmp_path, model, watch, stopper, min_steps=50)
    assert stopper.stopped_step == MEMORIZE_FROM and trainer.global_step == 50
    assert same_weights(model.state_dict(), snapshots[25])


def test_resume_keeps_the_flags_and_the_kept_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = CopyingToy()
    watch, snapshots = real_watch(first), {}
    watch.add_listener(snapshot_listener(snapshots))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=30, save_top_k=-1)
    fit(tmp_path / "a", first, watch, MemorizationEarlyStopping(watch), max_steps=30, extra=[ckpt])
    assert watch.tau_gen == 15 and watch.tau_mem is None
    path = next((tmp_path / "ckpt").glob("*step=30*.ckpt"))

    model = CopyingToy()
    resumed = real_watch(model)
    stopper = MemorizationEarlyStopping(resumed)
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=30, save_top_k=-1)
    trainer = fit(tmp_path / "b", model, resumed, stopper, ckpt_path=str(path), extra=[ckpt2])
    # without the restored flag the detector would flag tau_gen again at step 35 (0.99 <= 1.1)
    assert resumed.tau_gen == 15 and resumed.tau_mem == MEMORIZE_FROM
    assert [r["step"] for r in resumed.history] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert trainer.global_step == MEMORIZE_FROM and stopper.stopped_step == MEMORIZE_FROM
    assert (stopper.best_step, stopper.best_score) == (25, 0.95)
    assert same_weights(model.state_dict(), snapshots[25])  # kept in the checkpoint, restored after resume


@pytest.mark.slow
def test_ddp_two_ranks_stop_at_the_same_step(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("_ddp_early_stopping.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, str(script), str(tmp_path), "2"]
    subprocess.run(command, check=True, env=env, timeout=300, cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert ranks[0] == {
        "global_step": MEMORIZE_FROM, "stopped_step": MEMORIZE_FROM, "tau_gen": 15, "tau_mem": MEMORIZE_FROM,
        "best_step": 25, "restored_step": 25, "weights_are_step_25": True, "stopping_reason": 1,
    }
    assert (tmp_path / "best" / BEST_FILENAME).exists()


# -- copying before the quality plateau (issue 10, item 2) -------------------------------------------------
def test_copying_before_the_quality_plateau_restores_the_best_pre_onset_weights(monkeypatch):
    # FID still falls when f_mem becomes significant at step 60: tau_gen never fires (default plateau rule)
    history = [rec(10, 300.0), rec(20, 150.0), rec(30, 80.0), rec(40, 50.0), rec(50, 35.0),
               rec(60, 30.0, 0.3), rec(70, 28.0, 0.5)]
    texts = []
    monkeypatch.setattr(
        "lightning_memwatch.callbacks.early_stopping.mwlog.log_text",
        lambda trainer, tag, text, step: texts.append((tag, text, step)),
    )
    watch, stopper, trainer, module = make(ScriptedWatch())
    trainer.loggers = [object()]
    with pytest.warns(UserWarning, match="quality was still improving when copying began"):
        train(watch, stopper, trainer, module, history)
    assert watch.tau_gen is None and watch.tau_mem == 60 and stopper.stopped_step == 60
    assert (stopper.best_step, stopper.best_score, stopper.restored_step) == (50, 35.0, 50)
    assert weights_step(module) == 50.0  # not the copying weights of step 60
    assert "restored step 50, fid 35, f_mem 0" in stopper.stopping_reason_message
    assert texts == [("memwatch/early_stopping", stopper.stopping_reason_message, 60)]


def test_stop_message_says_when_quality_had_stopped_improving_before_the_onset(monkeypatch):
    # FID turned up at step 50 (best at 40), then copying began at 60 before the plateau rule confirmed anything:
    # the message must not claim that quality was still improving
    history = [rec(10, 300.0), rec(20, 150.0), rec(30, 80.0), rec(40, 50.0), rec(50, 55.0),
               rec(60, 60.0, 0.3), rec(70, 65.0, 0.5)]
    monkeypatch.setattr("lightning_memwatch.callbacks.early_stopping.mwlog.log_text", lambda *a: None)
    watch, stopper, trainer, module = make(ScriptedWatch())
    train(watch, stopper, trainer, module, history)
    assert watch.tau_gen is None and stopper.stopped_step == 60 and stopper.restored_step == 40
    message = stopper.stopping_reason_message
    assert "quality stopped improving after step 40" in message and "still improving" not in message
    assert "restored step 40, fid 50, f_mem 0" in message


# -- EMA / WeightAveraging (issue 10, item 4) --------------------------------------------------------------
class OwnEMA:
    """Recomputes EMAWeightAveraging's average from the raw weights (public hooks only), to check MemWatch."""

    def __init__(self, decay):
        from lightning.pytorch import Callback

        self.decay, self.average, self.raw = decay, None, {}
        outer = self

        class Recorder(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                raw = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
                outer.raw[trainer.global_step] = raw
                if outer.average is None:
                    outer.average = raw
                else:
                    outer.average = {
                        k: outer.decay * outer.average[k] + (1 - outer.decay) * raw[k]
                        if raw[k].is_floating_point() else raw[k] for k in raw
                    }

        self.callback = Recorder()


@pytest.mark.parametrize("ema_last", [False, True])
def test_under_an_averaging_callback_the_restored_weights_are_the_scored_ones(tmp_path, ema_last):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    model = CopyingToy()
    watch, scored, averages = real_watch(model), {}, {}
    own = OwnEMA(0.5)
    watch.add_listener(snapshot_listener(scored))
    watch.add_listener(lambda trainer, pl_module, record: averages.setdefault(record["step"], own.average))
    stopper = MemorizationEarlyStopping(watch, verbose=True)
    ema = EMAWeightAveraging(decay=0.5)
    # ema_last: EMA's own on_train_end (copying its final average in) runs after the stopper's restore
    callbacks = [own.callback, watch, stopper, ema] if ema_last else [own.callback, ema, watch, stopper]
    from lightning.pytorch import Trainer

    Trainer(
        max_steps=100, callbacks=callbacks, logger=False, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), enable_checkpointing=False,
    ).fit(model, loader())
    assert watch.scored_weights.name == "averaged" and stopper.restored_step == 25
    if not ema_last:  # EMA updated before MemWatch evaluated: the scored weights are the average of this step
        assert all(torch.allclose(scored[25][k], averages[25][k], atol=1e-6) for k in scored[25])
    assert not same_weights(scored[25], own.raw[25])  # the average, not the raw weights of step 25
    assert same_weights(model.state_dict(), scored[25])  # exactly the weights that were scored


def test_module_ema_copy_is_scored_and_the_raw_weights_come_back():
    from lightning_memwatch.weights import ModuleEMA, resolve_weights

    module = Tiny()
    module.ema = torch.nn.Linear(3, 1)
    with torch.no_grad():
        module.layer.weight.fill_(1.0)
        module.ema.weight.fill_(2.0)
    scored = resolve_weights(ModuleEMA("ema", target="layer"), SimpleNamespace(callbacks=[]), module)
    with scored.applied(None, module):
        assert float(module.layer.weight.detach().unique()) == 2.0
    assert float(module.layer.weight.detach().unique()) == 1.0
    with pytest.raises(MisconfigurationException, match="no module attribute `nope`"):
        resolve_weights(ModuleEMA("nope"), SimpleNamespace(callbacks=[]), module)
    with pytest.raises(MisconfigurationException, match="WeightAveraging"):
        resolve_weights("averaged", SimpleNamespace(callbacks=[]), module)
    from lightning_memwatch import MemWatch

    with pytest.raises(ValueError, match=r"'auto', 'raw', 'averaged' or ModuleEMA.*got 'ema'"):
        MemWatch(weights="ema")


# -- setup-time errors (issue 10, item 6) -------------------------------------------------------------------
def test_fid_off_or_a_missing_monitor_fails_at_setup_with_a_strict_stopper(tmp_path):
    from lightning_memwatch import MemWatch

    for watch, monitor in ((MemWatch(fid=None), None), (MemWatch(metrics={"quality": lambda g: 0.0}), "val")):
        stopper = MemorizationEarlyStopping(watch, monitor=monitor)
        trainer = SimpleNamespace(callbacks=[watch, stopper], strategy=FakeStrategy(), global_step=0)
        with pytest.raises(MisconfigurationException, match=r"will not hold.*strict=False"):
            stopper.setup(trainer, Tiny(), "fit")
    watch = MemWatch(metrics={"val": lambda g: 0.0})
    stopper = MemorizationEarlyStopping(watch, monitor="val")
    stopper.setup(SimpleNamespace(callbacks=[watch, stopper], strategy=FakeStrategy(), global_step=0), Tiny(), "fit")


# -- faults and resume (issue 11) ------------------------------------------------------------------------
def test_a_truncated_best_weights_file_warns_and_keeps_the_final_weights(tmp_path):
    watch, stopper, trainer, module = make(dirpath=tmp_path)
    train(watch, stopper, trainer, module, FLOOR_RUN, end=False)
    path = tmp_path / BEST_FILENAME
    assert stopper.best_model_path == str(path) and not list(tmp_path.glob("*.tmp"))  # written aside, renamed
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="could not read .*keeps its final weights"):
        stopper.on_train_end(trainer, module)
    assert weights_step(module) == 70.0 and stopper.restored_step is None


def test_resuming_a_run_that_already_stopped_stops_at_once(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    first = CopyingToy()
    watch, snapshots = real_watch(first), {}
    watch.add_listener(snapshot_listener(snapshots))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    fit(tmp_path / "a", first, watch, MemorizationEarlyStopping(watch), extra=[ckpt])
    path = next((tmp_path / "ckpt").glob(f"*step={MEMORIZE_FROM}*.ckpt"))

    model = CopyingToy()
    resumed = real_watch(model)
    stopper = MemorizationEarlyStopping(resumed)
    trainer = fit(tmp_path / "b", model, resumed, stopper, ckpt_path=str(path))
    assert trainer.global_step == MEMORIZE_FROM and resumed.history[-1]["step"] == MEMORIZE_FROM  # no more steps
    assert stopper.stopped_step == MEMORIZE_FROM and stopper.restored_step == 25
    assert same_weights(model.state_dict(), snapshots[25])


def test_a_watch_that_restored_nothing_says_so_and_the_stopper_drops_its_kept_weights(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_memwatch import EvalSchedule, MemWatch

    first = CopyingToy()
    watch = real_watch(first)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=30, save_top_k=-1)
    fit(tmp_path / "a", first, watch, MemorizationEarlyStopping(watch), max_steps=30, extra=[ckpt])
    path = next((tmp_path / "ckpt").glob("*step=30*.ckpt"))

    model = CopyingToy()
    other = MemWatch(  # another num_samples: Lightning has no state for this watch's state_key
        num_samples=12, sample_batch_size=12, schedule=EvalSchedule.every(5), bootstrap=100, verbose=False,
        log_images=False, metrics={"quality": lambda generated: QUALITY[model.global_step]},
        detector=TimescaleDetector(quality_key="quality", floor=1.0),
    )
    stopper = MemorizationEarlyStopping(other)
    snapshots = {}
    other.add_listener(snapshot_listener(snapshots))
    with pytest.warns(UserWarning) as caught:
        fit(tmp_path / "b", model, other, stopper, ckpt_path=str(path))
    text = "\n".join(str(w.message) for w in caught)
    assert "num_samples: 24 -> 12" in text and "restored nothing" in text and "6 evaluation(s)" in text
    assert "kept weights (step 25)" in text and "dropped" in text
    # a new history from the resume step: the best before the onset at 40 is 35, never the old history's 25
    assert [r["step"] for r in other.history] == [30, 35, 40] and stopper.restored_step == 35
    assert same_weights(model.state_dict(), snapshots[35])


def test_a_watch_stand_in_missing_part_of_the_contract_is_refused_by_name():
    class Partial:  # a watch without record_keys and scored_weights
        detector = TimescaleDetector()
        history: list = []

        def add_listener(self, fn):
            pass

        def add_event_listener(self, fn):
            pass

    with pytest.raises(TypeError, match=r"got Partial \(it lacks record_keys, scored_weights\)"):
        MemorizationEarlyStopping(Partial())

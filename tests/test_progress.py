"""Progress inside the trainer's own bar (TQDM and Rich), silent without one; the one setup summary line."""

from __future__ import annotations

import io
import logging
import re

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import EvalSchedule, MemWatch
from lightning_memwatch.progress import CostNote, EvalProgress, setup_summary

TRAIN = toy_images(48, seed=3)


def _fit(tmp_path, bar, watch, spy_module, max_steps=10):
    trainer = Trainer(
        max_steps=max_steps,
        callbacks=[watch] + ([bar] if bar is not None else []),
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=bar is not None,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(spy_module, toy_loader(TRAIN))
    return trainer


class BarReadingToy(ToyDiffusion):
    """Reads the progress bar's evaluation line at each sampler call (what a user sees mid-evaluation)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shown: list[tuple[str, float, float]] = []

    def sample(self, num_samples, generator=None, noise=None):
        bar = self.trainer.progress_bar_callback
        if isinstance(bar, RichProgressBar) and bar.progress is not None:
            for task in bar.progress.tasks:
                if task.description.startswith("MemWatch"):
                    self.shown.append((task.description, float(task.completed), float(task.total)))
        return super().sample(num_samples, generator=generator, noise=noise)


def test_tqdm_bar_shows_sampling_progress_under_the_training_bar(tmp_path, monkeypatch):
    out = io.StringIO()
    import lightning.pytorch.callbacks.progress.tqdm_progress as tqdm_progress

    monkeypatch.setattr(tqdm_progress.sys, "stdout", out)  # the bars write to sys.stdout
    watch = MemWatch(num_samples=24, sample_batch_size=8, schedule=EvalSchedule.every(5), bootstrap=50,
                     verbose=False, log_images=False)
    _fit(tmp_path, TQDMProgressBar(refresh_rate=1), watch, ToyDiffusion(TRAIN))
    text = out.getvalue()
    # 3 sampler calls of 8 per evaluation: the bar counts 8, 16, 24 of 24 images at steps 5 and 10
    for step in (5, 10):
        for done in (8, 16, 24):
            assert re.search(rf"MemWatch step {step}: sampling[^\n\r]*{done}/24", text), (step, done)
    assert "MemWatch step 10: nearest neighbours" in text


def test_rich_bar_shows_a_task_per_evaluation_and_removes_it(tmp_path):
    pytest.importorskip("rich")
    watch = MemWatch(num_samples=24, sample_batch_size=8, schedule=EvalSchedule.every(5), bootstrap=50,
                     verbose=False, log_images=False)
    model = BarReadingToy(TRAIN)
    bar = RichProgressBar(refresh_rate=1)
    _fit(tmp_path, bar, watch, model)
    # at each sampler call the task shows the images done so far, out of this rank's 24
    assert [s[1:] for s in model.shown] == [(0.0, 24.0), (8.0, 24.0), (16.0, 24.0)] * 2
    assert {s[0] for s in model.shown} == {"MemWatch step 5: sampling", "MemWatch step 10: sampling"}
    assert not any(t.description.startswith("MemWatch") for t in bar.progress.tasks)  # removed after each


def test_silent_without_a_progress_bar(tmp_path, capsys):
    watch = MemWatch(num_samples=16, sample_batch_size=8, schedule=EvalSchedule.every(5), bootstrap=50,
                     verbose=False, log_images=False)
    _fit(tmp_path, None, watch, ToyDiffusion(TRAIN))
    assert "MemWatch step" not in capsys.readouterr().out
    trainer = Trainer(enable_progress_bar=False, logger=False)
    with EvalProgress(trainer, total=4, step=0) as progress:
        progress.advance(4)
    assert not progress.shown and progress.done == 4


def test_one_setup_summary_line_per_fit(tmp_path, caplog):
    watch = MemWatch(num_samples=16, sample_batch_size=8, schedule=EvalSchedule.every(5), bootstrap=50,
                     verbose=True, log_images=False, knn_backend="torch")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        _fit(tmp_path, None, watch, ToyDiffusion(TRAIN), max_steps=5)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MemWatch: indexed")]
    assert lines == [
        "MemWatch: indexed 48 training images (1x8x8, pixel space) with the torch backend; no FID; "
        "next evaluation at step 5: 16 samples in 2 sampler calls of up to 8 images"
    ]
    # the evaluation line keeps its timings
    evals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MemWatch step 5:")]
    assert len(evals) == 1 and re.search(r"\(sampling \d+\.\d s, metrics \d+\.\d\d s\)", evals[0])


def test_setup_summary_wording():
    fid = {"extractor": "inception-v3", "reference": "reference", "num_reference": 10000, "reference_stats": "cache"}
    line = setup_summary(num_train=50000, image_shape=(3, 32, 32), backend="faiss-cpu", feature_dim=None,
                         fid=fid, next_step=None, num_samples=1000, sample_batch_size=250)
    assert "50,000 training images (3x32x32, pixel space) with the faiss-cpu backend" in line
    assert "FID with inception-v3 against 10,000 reference images (cache hit)" in line
    assert line.endswith("no evaluation left in the schedule")
    fid["reference_stats"] = "computed"
    line = setup_summary(num_train=10, image_shape=(1, 8, 8), backend="torch", feature_dim=16, fid=fid,
                         next_step=500, num_samples=1000, sample_batch_size=250, world_size=2, last_seconds=52.4)
    assert "(1x8x8, 16-d features)" in line and "(cache miss, computed)" in line
    assert line.endswith(
        "next evaluation at step 500: 1,000 samples in 2 sampler calls of up to 250 images on each of 2 ranks, "
        "about 52 s as the last evaluation took"
    )



def test_the_cost_note_speaks_once_when_an_evaluation_outweighs_the_training_before_it():
    clock = iter([0.0, 10.0, 29.0, 30.0, 67.0, 68.0, 69.0, 99.0]).__next__  # seconds, one read per call
    note = CostNote(clock)
    note.training_from(0)
    note.evaluating()
    assert note.evaluated(100, "fewer samples") is None  # 19 s of evaluation after 10 s of training: < twice
    note.evaluating()  # 1 s of training since the last evaluation ended
    said = note.evaluated(200, "fewer samples")
    assert said == (
        "MemWatch: the evaluation at step 200 took 37.0 s, the 100 training steps before it 1.0 s: watching takes "
        "more than twice the time of training here. To watch less often: fewer samples."
    )
    note.evaluating()
    assert note.evaluated(300, "fewer samples") is None and note.said  # once per fit


class SlowSampler(ToyDiffusion):
    """Sampling takes 0.5 s per call: the evaluation outweighs two toy training steps on any machine."""

    def sample(self, num_samples, generator=None, noise=None):
        import time

        time.sleep(0.5)
        return super().sample(num_samples, generator=generator, noise=noise)


def test_memwatch_says_once_when_watching_outweighs_training(tmp_path, caplog):
    watch = MemWatch(num_samples=16, sample_batch_size=16, schedule=EvalSchedule.every(2), bootstrap=50,
                     verbose=True, log_images=False, knn_backend="torch")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        _fit(tmp_path, None, watch, SlowSampler(TRAIN), max_steps=6)
    said = [r.getMessage() for r in caplog.records if "watching takes more than twice" in r.getMessage()]
    assert len(said) == 1 and re.match(r"MemWatch: the evaluation at step [246] took \d+\.\d s", said[0])
    assert "`schedule=` than EvalSchedule(every_n_train_steps=2" in said[0] and "`num_samples=` than 16" in said[0]

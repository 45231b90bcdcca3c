"""Class-conditional models: labels in the sampler contract, per-class f_mem and tau_mem, the copy table."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset
from toys import ConditionalCopier, ToyDiffusion, copied_row, toy_images, toy_labelled_loader, toy_loader

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
from lightning_memwatch.callbacks._copies import COPIES_IMAGE, COPIES_TEXT
from lightning_memwatch.copies import CSV_NAME, CopyTable
from lightning_memwatch.detection import TimescaleEvent
from lightning_memwatch.labels import balanced_labels, draw_labels, labels_key, sample_labels
from lightning_memwatch.metrics.per_class import per_class_memorization
from lightning_memwatch.record import ClassRecord, EvalRecord
from lightning_memwatch.sampling import per_sample_noise, rank_slice

TRAIN = toy_images(60)
LABELS = torch.arange(60) % 5  # 12 training images per class
NUM = 100  # balanced: 20 samples per class, the detector's default min_class_samples


def make_trainer(tmp_path, callbacks, max_steps=40, logger=False):
    return Trainer(
        max_steps=max_steps, callbacks=callbacks, logger=logger, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )  # fmt: skip


def make_watch(**kwargs):
    settings = dict(num_samples=NUM, sample_batch_size=25, schedule=EvalSchedule.every(10), bootstrap=200,
                    verbose=False, labels="balanced")  # fmt: skip
    settings.update(kwargs)
    return MemWatch(**settings)


def expected_copies(steps: list[int], label: int = 3, source: int | None = None) -> dict[int, int]:
    """Training row -> times copied over ``steps`` by ConditionalCopier's class ``label`` (balanced labels), from
    the training images of class ``source`` (default ``label``)."""
    labels = balanced_labels(NUM, range(5))
    noise = per_sample_noise(range(NUM), TRAIN.shape[1:], seed=0)
    counts: dict[int, int] = {}
    for i in (labels == label).nonzero().flatten().tolist():
        row = copied_row(noise[i], LABELS, label if source is None else source)
        counts[row] = counts.get(row, 0) + len(steps)
    return counts


# -- labels -----------------------------------------------------------------------------------------------
def test_labels_of_each_sample_are_the_same_across_batch_sizes_and_world_sizes(tmp_path):
    everything = draw_labels(range(500), LABELS, seed=7)
    for world in (2, 3):
        split = torch.cat([draw_labels(rank_slice(500, r, world), LABELS, seed=7) for r in range(world)])
        assert torch.equal(split, everything)
    counts = torch.bincount(everything, minlength=5)  # drawn with the training frequencies (1/5 each)
    assert counts.min() > 60 and counts.max() < 140
    assert not torch.equal(draw_labels(range(500), LABELS, seed=8), everything)

    seen = {}
    for batch_size in (4, 7):
        model = ConditionalCopier(TRAIN, LABELS, memorize_from=1000)
        watch = make_watch(num_samples=30, sample_batch_size=batch_size, labels=None)
        make_trainer(tmp_path / str(batch_size), [watch], max_steps=20).fit(model, toy_labelled_loader(TRAIN, LABELS))
        calls = torch.cat(model.seen_labels)
        assert torch.equal(calls[:30], calls[30:])  # the same classes at every evaluation
        seen[batch_size] = calls[:30]
    assert torch.equal(seen[4], seen[7]) and torch.equal(seen[4], draw_labels(range(30), LABELS, seed=0))


def test_given_and_balanced_labels():
    assert balanced_labels(7, [0, 2, 5]).tolist() == [0, 2, 5, 0, 2, 5, 0]
    given = torch.tensor([4, 4, 0])
    assert torch.equal(sample_labels(given, LABELS, 3, seed=0), given)


# -- per-class f_mem, events and the copy table -------------------------------------------------------------------
def test_class_3_copying_flags_class_3_alone_and_lists_exactly_its_training_images(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = ConditionalCopier(TRAIN, LABELS, copying=(3,), memorize_from=20)
    watch = make_watch(verbose=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        make_trainer(tmp_path, [watch, ckpt], logger=logger).fit(model, toy_labelled_loader(TRAIN, LABELS))

    per_class = [r.per_class for r in watch.history]
    assert [sorted(c) for c in per_class] == [[0, 1, 2, 3, 4]] * 4
    assert [c[3].f_mem for c in per_class] == [0.0, 1.0, 1.0, 1.0]
    assert all(c[k].f_mem == 0.0 and c[k].num_samples == 20 for c in per_class for k in (0, 1, 2, 4))
    assert per_class[1][3].f_mem_ci_low > 0.8 and per_class[0][3].f_mem_ci_high < 0.2
    assert list(watch.detector.class_tau_mem) == [3] and watch.detector.class_tau_mem[3].step == 20

    rows = watch.copied_training_images()
    expected = expected_copies([20, 30, 40])
    assert {r.train_index: r.times_copied for r in rows} == expected
    assert all(r.label == 3 and LABELS[r.train_index] == 3 and (r.first_step, r.last_step) == (20, 40) for r in rows)
    assert [r.times_copied for r in rows] == sorted(expected.values(), reverse=True)  # most copied first
    assert watch.copied_training_images(label=1) == []

    with (tmp_path / "ckpt" / CSV_NAME).open() as f:  # beside the checkpoints
        table = list(csv.DictReader(f))
    assert [(int(r["train_index"]), int(r["class"]), int(r["times_copied"])) for r in table] == [
        (r.train_index, 3, r.times_copied) for r in rows
    ]
    assert "copying classes: 3 (f_mem 1.000 of 20)" in caplog.text
    assert "tau_mem flagged for class 3 at step 20" in caplog.text

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("memwatch/f_mem/class_3")] == [(10, 0.0), (20, 1.0), (30, 1.0),
                                                                               (40, 1.0)]  # fmt: skip
    assert [e.step for e in acc.Scalars("memwatch/tau_mem/class_3")] == [20]
    assert COPIES_IMAGE in acc.Tags()["images"]
    assert f"{COPIES_TEXT}/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors(f"{COPIES_TEXT}/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith(f"Copied at step 40: class 3 ({len(expected)} images).")


def test_per_class_stop_only_when_asked(tmp_path):
    # f0 = 0.25: class 3 (all its samples copy) is flagged, the global f_mem (0.2) never is
    def fit(per_class):
        watch = make_watch(detector=TimescaleDetector(f0=0.25, quality_key="quality"),
                           metrics={"quality": lambda generated: 1.0})  # fmt: skip
        stopper = MemorizationEarlyStopping(watch, strict=False, per_class=per_class)
        model = ConditionalCopier(TRAIN, LABELS, copying=(3,), memorize_from=20)
        make_trainer(tmp_path / str(per_class), [watch, stopper]).fit(model, toy_labelled_loader(TRAIN, LABELS))
        return watch, stopper

    watch, stopper = fit(per_class=False)
    assert watch.tau_mem is None and stopper.stopped_step is None and watch.history[-1].step == 40
    watch, stopper = fit(per_class=True)
    assert stopper.stopped_step == 20 and stopper.best_step == 10 and watch.history[-1].step == 20


def test_default_stopper_never_keeps_weights_while_a_class_copies(tmp_path):
    # class 3 copies from step 20 on while the global f_mem (0.2) stays under f0 = 0.25 and the quality keeps
    # improving: the default stopper (per_class=False) does not stop, and keeps the weights of step 10
    calls = iter(range(100, 0, -1))  # the quality (lower is better) improves at every evaluation
    watch = make_watch(detector=TimescaleDetector(f0=0.25, quality_key="quality"),
                       metrics={"quality": lambda generated: float(next(calls))})  # fmt: skip
    stopper = MemorizationEarlyStopping(watch, strict=False)
    model = ConditionalCopier(TRAIN, LABELS, copying=(3,), memorize_from=20)
    make_trainer(tmp_path, [watch, stopper]).fit(model, toy_labelled_loader(TRAIN, LABELS))
    assert stopper.stopped_step is None and watch.history[-1].step == 40
    assert [r.step for r in watch.history if watch.detector.classes_memorizing(r)] == [20, 30, 40]
    assert stopper.best_step == 10


def test_copy_table_survives_a_resume_bit_for_bit(tmp_path):
    def watch_and_model():
        return make_watch(), ConditionalCopier(TRAIN, LABELS, copying=(1, 3), memorize_from=10)

    full, model = watch_and_model()
    make_trainer(tmp_path / "a", [full]).fit(model, toy_labelled_loader(TRAIN, LABELS))

    first, model = watch_and_model()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    make_trainer(tmp_path / "b", [first, ckpt], max_steps=20).fit(model, toy_labelled_loader(TRAIN, LABELS))
    assert len(first.copied_training_images()) > 0  # copies before the checkpoint
    path = next((tmp_path / "ckpt").glob("*step=20*.ckpt"))
    resumed, model = watch_and_model()
    make_trainer(tmp_path / "c", [resumed]).fit(model, toy_labelled_loader(TRAIN, LABELS), ckpt_path=str(path))

    assert resumed.state_dict()["copies"] == full.state_dict()["copies"]
    assert resumed.copied_training_images() == full.copied_training_images()
    assert {r.label for r in full.copied_training_images()} == {1, 3}
    assert [r.per_class for r in resumed.history] == [r.per_class for r in full.history]
    assert resumed.detector.state_dict() == full.detector.state_dict()

    table = CopyTable()
    table.load_state_dict(full.state_dict()["copies"])
    assert table.rows() == full.copied_training_images() and table.to_csv() == full._copies.to_csv()


def test_ddp_two_gloo_ranks_hold_the_single_process_table(tmp_path):
    script = Path(__file__).parent / "callbacks" / "_ddp_conditional.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {"d1": ("1", "auto"), "d2": ("2", "auto"), "d2rank0": ("2", "rank0")}  # sharded index, then rank 0's
    for name, (devices, sharding) in runs.items():
        subprocess.run([sys.executable, str(script), str(tmp_path / name), devices, sharding], check=True, env=env,
                       timeout=300, cwd=tmp_path)  # fmt: skip
    single = json.loads((tmp_path / "d1" / "rank0.json").read_text())
    for name in ("d2", "d2rank0"):
        rank0 = json.loads((tmp_path / name / "rank0.json").read_text())
        rank1 = json.loads((tmp_path / name / "rank1.json").read_text())
        assert rank0["copies"] == rank1["copies"] == single["copies"] and single["copies"], name
        assert rank0["per_class"] == rank1["per_class"] == single["per_class"], name
        assert rank0["class_tau_mem"] == rank1["class_tau_mem"] == single["class_tau_mem"] == ["3"], name
        # each rank drew its share of the samples, with the classes of the single process
        assert rank0["labels"] + rank1["labels"] == single["labels"], name


# -- every bad input fails at setup, before the first training step -----------------------------------------------
UNLABELLED = DataLoader(TensorDataset(TRAIN), batch_size=16)
FLOAT_LABELS = DataLoader(TensorDataset(TRAIN, LABELS.float()), batch_size=16)


@pytest.mark.parametrize(
    ("conditional", "loader", "kwargs", "error", "match"),
    [
        (False, None, {"labels": "balanced"}, ValueError, "the sampler takes no `labels`"),
        (False, None, {"train_labels": LABELS}, ValueError, "the sampler takes no `labels`"),
        (True, UNLABELLED, {}, ValueError, "training data holds no labels"),
        (True, FLOAT_LABELS, {}, TypeError, "float second tensor"),
        (True, None, {"labels": torch.full((NUM,), 7)}, ValueError, r"class\(es\) \[7\] that no training image has"),
        (True, None, {"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"shape \(100,\)"),
        (True, None, {"labels": torch.zeros(NUM)}, TypeError, "LongTensor"),
        (True, None, {"labels": "even"}, ValueError, "'balanced'"),
        (True, None, {"train_labels": LABELS[:10]}, ValueError, "there are 60 training images"),
        (True, None, {"train_labels": -LABELS}, ValueError, "negative class"),
    ],
)
def test_bad_labels_fail_at_setup(tmp_path, conditional, loader, kwargs, error, match):
    model = ConditionalCopier(TRAIN, LABELS) if conditional else ToyDiffusion(TRAIN)
    loader = loader or (toy_labelled_loader(TRAIN, LABELS) if conditional else toy_loader(TRAIN))
    trainer = make_trainer(tmp_path, [make_watch(**{"labels": None, **kwargs})])
    with pytest.raises(error, match=match):
        trainer.fit(model, loader)
    assert trainer.global_step == 0 and model.sample_calls == 0


def test_an_unconditional_model_ignores_float_labels_in_its_batches(tmp_path):
    watch = make_watch(labels=None)
    make_trainer(tmp_path, [watch], max_steps=10).fit(ToyDiffusion(TRAIN), FLOAT_LABELS)
    assert watch.history[0].per_class == {} and "per_class" not in watch.history[0]


# -- pure parts ---------------------------------------------------------------------------------------------------
def test_per_class_fraction_and_record_round_trips():
    out = per_class_memorization(torch.tensor([True, True, False, False, False]), torch.tensor([2, 2, 0, 0, 2]))
    assert (out[2].num_samples, out[2].f_mem, out[0].f_mem) == (3, 2 / 3, 0.0)
    assert out[0].f_mem_ci_low == 0.0 < out[0].f_mem_ci_high
    record = EvalRecord(step=5, f_mem=0.4, per_class=out)
    assert EvalRecord.from_dict(record.to_dict()) == record
    assert EvalRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record  # JSON's string keys
    scalars = record.to_scalars()
    assert scalars["memwatch/f_mem/class_2"] == pytest.approx(2 / 3)
    back = EvalRecord.from_scalars(5, {**scalars, "memwatch/tau_mem/class_2": 5.0})  # an onset is the run's
    assert back.per_class == {0: ClassRecord(None, 0.0), 2: ClassRecord(None, pytest.approx(2 / 3))}
    assert back.metrics == {}


def test_detector_per_class_rule_patience_and_small_classes():
    detector = TimescaleDetector(patience=2, min_class_samples=10)

    def record(step, low3, n1=30):
        per_class = {1: {"num_samples": n1, "f_mem": 0.5, "f_mem_ci_low": 0.3},
                     3: {"num_samples": 30, "f_mem": low3, "f_mem_ci_low": low3}}  # fmt: skip
        return {"step": step, "f_mem": 0.0, "f_mem_ci_low": 0.0, "per_class": per_class}

    assert detector.update(record(10, 0.0, n1=5)) == []  # class 1: too few samples to decide
    assert "class 1: 5 samples < min_class_samples 10, not decided" in detector.status
    assert detector.update(record(20, 0.1)) == []  # class 1 and 3: the first of two
    events = detector.update(record(30, 0.2))
    assert [(e.name, e.label, e.step, e.confirmed_step) for e in events] == [("tau_mem", 1, 20, 30),
                                                                               ("tau_mem", 3, 20, 30)]  # fmt: skip
    assert detector.tau_mem is None and "tau_mem per class: class 1 at step 20, class 3 at step 20" in detector.status
    assert TimescaleEvent.from_dict(events[0].to_dict()) == events[0]
    again = TimescaleDetector(patience=2, min_class_samples=10)
    again.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert again.class_tau_mem == detector.class_tau_mem and again.state_dict() == detector.state_dict()


def test_copy_table_names_the_generated_class_that_copied_each_training_image(tmp_path):
    # samples generated for class 2 copy training images labelled 4 (as in a lucidrains run); class 3 its own
    model = ConditionalCopier(TRAIN, LABELS, copying=(2, 3), memorize_from=20, copy_from={2: 4})
    watch = make_watch()
    make_trainer(tmp_path, [watch], max_steps=30).fit(model, toy_labelled_loader(TRAIN, LABELS))

    rows = watch.copied_training_images()
    from_2, from_3 = expected_copies([20, 30], label=2, source=4), expected_copies([20, 30], label=3)
    assert {r.train_index: r.times_copied for r in rows} == {**from_2, **from_3}  # disjoint: classes 4 and 3
    assert all(r.label == 4 and r.generated_classes == ((2, r.times_copied),) for r in rows if r.train_index in from_2)
    assert all(r.label == 3 and r.generated_classes == ((3, r.times_copied),) for r in rows if r.train_index in from_3)

    with (tmp_path / CSV_NAME).open() as f:  # no checkpoint callback, no logger: the default_root_dir
        table = list(csv.DictReader(f))
    assert [(int(r["train_index"]), int(r["class"]), r["generated_classes"]) for r in table] == [
        (r.train_index, r.label, f"{r.generated_classes[0][0]}:{r.times_copied}") for r in rows
    ]
    assert "| generated for class (samples) |" in watch._copies.to_markdown()

    saved = watch.state_dict()["copies"]
    table = CopyTable()
    table.load_state_dict(saved)
    assert table.rows() == rows
    old = {"version": 1, "rows": [row[:5] for row in saved["rows"]]}  # saved before the generated classes
    table.load_state_dict(old)
    assert [(r.train_index, r.label, r.times_copied, r.generated_classes) for r in table.rows()] == [
        (r.train_index, r.label, r.times_copied, ()) for r in rows
    ]


def test_copy_table_unconditional_rows_have_no_generated_classes():
    table = CopyTable()
    table.update(step=10, train_indices=[5, 5], labels=None)
    table.update(step=20, train_indices=[5], labels=None, generated_labels=[1])
    assert table.rows()[0].generated_classes == ((1, 1),)
    assert table.to_csv().splitlines()[1] == "5,,3,10,20,1:1"


@pytest.mark.parametrize(
    ("saved", "resumed", "restores"),
    [("balanced", "balanced", True), ("balanced", None, False), (torch.arange(NUM) % 5, "balanced", False),
     (torch.arange(NUM) % 5, torch.arange(NUM) % 5, True), (torch.arange(NUM) % 5, (torch.arange(NUM) + 1) % 5, False)],
)  # fmt: skip
def test_a_changed_labels_setting_gives_another_state_key(tmp_path, recwarn, saved, resumed, restores):
    first = make_watch(labels=saved)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    model = ConditionalCopier(TRAIN, LABELS, copying=(3,), memorize_from=10)
    make_trainer(tmp_path / "a", [first, ckpt], max_steps=20).fit(model, toy_labelled_loader(TRAIN, LABELS))
    path = next((tmp_path / "ckpt").glob("*step=20*.ckpt"))

    again = make_watch(labels=resumed)
    assert (again.state_key == first.state_key) == restores
    model, data = ConditionalCopier(TRAIN, LABELS, copying=(3,), memorize_from=10), toy_labelled_loader(TRAIN, LABELS)
    make_trainer(tmp_path / "b", [again], max_steps=30).fit(model, data, ckpt_path=str(path))
    if not restores:
        said = " ".join(str(w.message) for w in recwarn)
        assert f"labels: {labels_key(saved)!r} -> {labels_key(resumed)!r}" in said  # names the changed setting
    steps = [r.step for r in again.history]
    assert steps == ([10, 20, 30] if restores else [20, 30])  # restored, else a new one from the resumed step
    if restores:
        assert [r.per_class for r in again.history[:2]] == [r.per_class for r in first.history]


def test_the_training_classes_given_join_the_state_key() -> None:
    # per-class records of one labelling are no history for another: a resume with other train_labels starts anew
    plain = make_watch()
    given = make_watch(train_labels=LABELS)
    assert given.state_key != plain.state_key
    assert make_watch(train_labels=LABELS.clone()).state_key == given.state_key
    assert make_watch(train_labels=(LABELS + 1) % 5).state_key != given.state_key


def test_checkpoints_saved_before_labels_joined_the_state_key_load_for_the_default_labels(tmp_path):
    watch = make_watch(labels=None)
    assert watch.state_key == "MemWatch{'num_samples': 100, 'seed': 0, 'threshold': 0.3333333333333333}"
    assert make_watch(labels="balanced").state_key != watch.state_key


# -- one pass over the training data reads the images and their labels -------------------------------------------
class CountingPairs(torch.utils.data.Dataset):
    """``(image, label)`` items (dicts with ``as_dict``), counting the reads of each item, as a dataset of files
    that decodes each read."""

    def __init__(self, images, labels, as_dict=False):
        self.images, self.labels, self.as_dict, self.reads = images, labels, as_dict, [0] * len(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads[i] += 1
        if self.as_dict:
            return {"image": self.images[i], "class_labels": self.labels[i]}
        return self.images[i], self.labels[i]


@pytest.mark.parametrize("as_dict", [False, True])
def test_images_and_labels_are_read_in_one_pass(as_dict):
    from lightning_memwatch.images import collect_images
    from lightning_memwatch.labels import read_labelled_images, read_train_labels

    data = CountingPairs(TRAIN, LABELS, as_dict=as_dict)
    loader = DataLoader(data, batch_size=7, shuffle=True)
    images, found = read_labelled_images(loader)
    assert data.reads == [1] * len(TRAIN)
    assert torch.equal(images, collect_images(loader)) and torch.equal(found.labels, read_train_labels(loader))
    assert torch.equal(found.labels, LABELS)
    images, found = read_labelled_images(DataLoader(TensorDataset(TRAIN), batch_size=7))
    assert torch.equal(images, TRAIN) and found.labels is None  # batches without labels
    with pytest.raises(ValueError, match="is empty"):
        read_labelled_images(CountingPairs(TRAIN[:0], LABELS[:0]))


def test_a_conditional_memwatch_reads_each_training_image_once_at_setup(tmp_path):
    data = CountingPairs(TRAIN, LABELS)
    watch = make_watch(train_data=data, schedule=EvalSchedule(steps=[10_000]))
    with pytest.warns(UserWarning, match="never fires"):
        make_trainer(tmp_path, [watch], max_steps=1).fit(
            ConditionalCopier(TRAIN, LABELS), toy_labelled_loader(TRAIN, LABELS)
        )
    assert data.reads == [1] * len(TRAIN)  # images and labels in one pass (they were two)
    assert torch.equal(watch.training_classes, LABELS)

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import EvalSchedule, MemWatch
from lightning_memwatch.callbacks.memwatch import collect_images
from lightning_memwatch.log import F_MEM, PAIRS_IMAGE, RATIO_HISTOGRAM, SAMPLES_IMAGE
from lightning_memwatch.record import EvalRecord

TRAIN = toy_images(64)


def make_trainer(tmp_path, callbacks, max_steps=40, logger=True, **kwargs):
    if logger is True:
        logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    return Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **kwargs,
    )


def make_watch(**kwargs):
    defaults = dict(
        num_samples=32, sample_batch_size=8, schedule=EvalSchedule.every(10), bootstrap=200, verbose=False
    )
    defaults.update(kwargs)
    return MemWatch(**defaults)


def test_fmem_zero_then_one_in_history_and_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    watch = make_watch()
    model = ToyDiffusion(TRAIN, memorize_from=20)
    make_trainer(tmp_path, [watch]).fit(model, toy_loader(TRAIN))
    assert [r["step"] for r in watch.history] == [10, 20, 30, 40]
    assert [r["f_mem"] for r in watch.history] == [0.0, 1.0, 1.0, 1.0]
    assert watch.history[0]["f_mem_ci_low"] == 0.0 < watch.history[0]["f_mem_ci_high"] < 0.2
    assert 0.8 < watch.history[1]["f_mem_ci_low"] < 1.0 == watch.history[1]["f_mem_ci_high"]
    assert watch.history[1]["ratio_median"] == 0.0 and watch.history[0]["ratio_median"] > 0.5
    # one sampling pass per evaluation (4 batches of 8), nothing between evaluations
    assert model.sample_calls == 4 * 4

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    scalars = {(e.step, e.value) for e in acc.Scalars(F_MEM)}
    assert scalars == {(10, 0.0), (20, 1.0), (30, 1.0), (40, 1.0)}
    assert {SAMPLES_IMAGE, PAIRS_IMAGE} <= set(acc.Tags()["images"])
    assert RATIO_HISTOGRAM in acc.Tags()["histograms"]


def test_step_zero_evaluation_and_non_tensorboard_logger(tmp_path):
    watch = make_watch(schedule=EvalSchedule.every(10, include_zero=True))
    logger = CSVLogger(str(tmp_path), name="csv", version=0)
    make_trainer(tmp_path, [watch], max_steps=10, logger=logger).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))
    assert [r["step"] for r in watch.history] == [0, 10]
    logged = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert F_MEM in logged.splitlines()[0]


def _serve_tensorboard(logdir: Path, stderr_path: Path) -> tuple[subprocess.Popen, str]:
    """Start TensorBoard on a port the OS picks (``--port 0``: no free-port race) and return it with its URL.

    Waits for the "TensorBoard ... at http://..." line on stderr; fails at once, with that stderr, if the server
    exits, and after 180 s (TensorBoard starts in ~5 s on an idle machine, several times that on a loaded one).
    """
    exe = Path(sys.executable).with_name("tensorboard")
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(exe), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", "0", "--load_fast=false"],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", stderr_path.read_text(errors="replace"))
        if found:
            return proc, f"http://127.0.0.1:{found[1]}"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait(timeout=20)
    raise AssertionError(f"tensorboard did not start (exit code {proc.returncode}):\n{stderr_path.read_text()}")


def test_fmem_read_back_through_tensorboard_http_api(tmp_path):
    watch = make_watch()
    make_trainer(tmp_path, [watch], max_steps=20).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))
    proc, base = _serve_tensorboard(tmp_path / "tb", tmp_path / "tensorboard.stderr")
    try:
        url = f"{base}/data/plugin/scalars/scalars?run=version_0&tag={F_MEM}"
        # the server is up; its first load of the (complete) event file may still be running
        deadline, points = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=10) as response:
                    points = json.loads(response.read())
                if len(points) >= 2:
                    break
            except (OSError, ValueError):  # 400 until the run is loaded; connection errors; partial JSON
                pass
            time.sleep(0.5)
        assert points, f"tensorboard served no memwatch/f_mem points:\n{(tmp_path / 'tensorboard.stderr').read_text()}"
        assert [(p[1], p[2]) for p in points] == [(10, 0.0), (20, 1.0)]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def test_stock_early_stopping_and_checkpoint_monitor_fmem(tmp_path):
    # step 0 is evaluated so the monitored key exists at the first epoch end (EarlyStopping is strict)
    watch = make_watch(schedule=EvalSchedule.every(10, include_zero=True))
    stop = EarlyStopping(
        monitor=F_MEM, mode="min", patience=100, divergence_threshold=0.5, check_on_train_epoch_end=True
    )
    ckpt = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor=F_MEM, mode="min", every_n_train_steps=10, save_top_k=1
    )
    trainer = make_trainer(tmp_path, [watch, stop, ckpt], max_steps=100)
    trainer.fit(ToyDiffusion(TRAIN, memorize_from=20), toy_loader(TRAIN))
    assert trainer.global_step == 20  # epochs are 4 steps: the epoch ending at step 20 saw f_mem = 1
    assert float(ckpt.best_model_score) == 0.0
    assert "step=10" in Path(ckpt.best_model_path).name


def test_resume_gives_the_uninterrupted_history(tmp_path):
    full = make_watch()
    make_trainer(tmp_path / "a", [full]).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))

    first = make_watch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1)
    make_trainer(tmp_path / "b", [first, ckpt], max_steps=20).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))
    path = next((tmp_path / "ckpt").glob("*step=20*.ckpt"))

    resumed, model = make_watch(), ToyDiffusion(TRAIN)
    make_trainer(tmp_path / "c", [resumed, ModelCheckpoint(dirpath=tmp_path / "c2")], max_steps=40).fit(
        model, toy_loader(TRAIN), ckpt_path=str(path)
    )
    keys = ("step", "f_mem", "f_mem_ci_low", "f_mem_ci_high", "ratio_median")
    assert [[r[k] for k in keys] for r in resumed.history] == [[r[k] for k in keys] for r in full.history]
    assert model.sample_calls == 2 * 4  # only steps 30 and 40 were sampled after the resume


def test_state_dict_round_trip():
    watch = make_watch()
    watch.history = [EvalRecord(step=10, f_mem=0.5, f_mem_ci_low=0.2, f_mem_ci_high=0.7, metrics={"q": 1.5})]
    watch._last_evaluated_step = 10
    other = make_watch()
    other.load_state_dict(watch.state_dict())
    assert other.history == watch.history and other.state_dict() == watch.state_dict()
    assert all(type(r) is dict for r in watch.state_dict()["history"])  # plain Python in checkpoints
    assert other.history[0].metrics == {"q": 1.5} and other.history[0]["q"] == 1.5


def test_a_checkpoint_with_the_dict_records_of_earlier_versions_loads():
    old = {"step": 10, "num_samples": 4, "f_mem": 0.25, "f_mem_ci_low": 0.0, "f_mem_ci_high": 0.6,
           "ratio_q05": 0.1, "ratio_q25": 0.2, "ratio_median": 0.5, "ratio_q75": 0.7, "ratio_q95": 0.9,
           "fid": None, "fid_num_samples": None, "sharpness": 3.0, "metric_seconds": 0.1, "sample_seconds": 1.0}
    state = make_watch().state_dict() | {"history": [old], "last_evaluated_step": 10}
    watch = make_watch()
    watch.load_state_dict(state)
    record = watch.history[0]
    assert isinstance(record, EvalRecord) and record.metrics == {"sharpness": 3.0} and record.num_samples == 4
    assert dict(record) == old  # the same keys, order and values as the old record


def test_same_samples_across_evaluations_and_batch_sizes(tmp_path):
    def run(batch_size):
        captured = []
        watch = make_watch(
            sample_batch_size=batch_size, metrics={"capture": lambda x: captured.append(x.clone()) or 0.0}
        )
        make_trainer(tmp_path / str(batch_size), [watch], max_steps=20, logger=False).fit(
            ToyDiffusion(TRAIN, memorize_from=1000, lr=0.0), toy_loader(TRAIN)
        )
        return captured

    a, b = run(32), run(1)
    assert len(a) == 2 and torch.equal(a[0], a[1])  # unchanged weights: identical samples
    assert torch.equal(a[0], b[0])  # per-sample seeding: batch size does not matter


class NoSampler(ToyDiffusion):
    sample = None


def test_module_without_sampler_fails_at_setup(tmp_path):
    with pytest.raises(AttributeError, match="has no `sample` method"):
        make_trainer(tmp_path, [make_watch()], logger=False).fit(NoSampler(TRAIN), toy_loader(TRAIN))


def test_sampler_returning_wrong_count_is_named(tmp_path):
    watch = make_watch(sample_fn=lambda module, n, generator=None: torch.zeros(n + 1, 1, 8, 8))
    with pytest.raises(ValueError, match="MemWatch.sample_fn was asked for 8 samples and returned 9"):
        make_trainer(tmp_path, [watch], logger=False).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))


def test_sample_fn_with_noise_gets_per_sample_noise(tmp_path):
    seen = []

    def sample_fn(module, n, generator=None, noise=None):
        seen.append(noise.shape)
        return noise.clamp(-1, 1)

    watch = make_watch(sample_fn=sample_fn)
    make_trainer(tmp_path, [watch], max_steps=10, logger=False).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))
    assert seen == [torch.Size([8, 1, 8, 8])] * 4


def test_bad_training_data():
    with pytest.raises(ValueError, match="data_range"):
        from lightning_memwatch._checks import check_range

        check_range(TRAIN * 255, "train_data", (-1.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        collect_images(torch.utils.data.TensorDataset(torch.empty(0, 1, 8, 8)))
    with pytest.raises(TypeError, match="floating-point"):
        collect_images((TRAIN * 100).long())
    images = collect_images(toy_loader(TRAIN))  # shuffled loader: read back in dataset order
    assert torch.equal(images, TRAIN)


@pytest.mark.slow
def test_ddp_two_ranks_equal_single_process(tmp_path):
    script = Path(__file__).with_name("_ddp_memwatch.py")
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
    assert rank0 == rank1
    keys = ("step", "f_mem", "f_mem_ci_low", "f_mem_ci_high", "ratio_median", "num_samples")
    assert [[r[k] for k in keys] for r in rank0] == [[r[k] for k in keys] for r in single]
    assert [r["f_mem"] for r in single] == [0.0, 1.0]


class TinyFeatures(torch.nn.Module):
    """A frozen conv feature extractor: images (N, 1, 8, 8) -> (N, 8)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.requires_grad_(False)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_fid_from_the_same_sampling_pass(tmp_path):
    from lightning_memwatch import FID
    from lightning_memwatch.log import FID_KEY

    reference = toy_images(48, seed=1)
    fid = FID(reference=reference, feature_extractor=TinyFeatures(), num_samples=48, cache_dir=tmp_path / "cache")
    watch = make_watch(fid=fid)
    model = ToyDiffusion(TRAIN, memorize_from=20)
    make_trainer(tmp_path, [watch], max_steps=20).fit(model, toy_loader(TRAIN))
    assert model.sample_calls == 2 * 6  # 48 samples in batches of 8, once per evaluation, for both metrics
    assert [r["num_samples"] for r in watch.history] == [32, 32]
    assert [r["fid_num_samples"] for r in watch.history] == [48, 48]
    fids = [r["fid"] for r in watch.history]
    assert all(f > 0 for f in fids) and fids[0] != fids[1]
    assert watch.fid_evaluator.num_reference_forward_passes > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"))
    acc.Reload()
    assert [round(e.value, 4) for e in acc.Scalars(FID_KEY)] == [round(f, 4) for f in fids]
    # the training images' own FID against the reference, once, with as many images as the samples (48)
    floor = watch.fid_evaluator.train_floor(TRAIN[:48])
    assert watch.fid_train_floor == pytest.approx(floor, rel=1e-6, abs=1e-9) and floor > 0
    assert [e.step for e in acc.Scalars("memwatch/fid_train_floor")] == [0]
    assert watch.detector.reference_floor == watch.fid_train_floor  # the default rule's scale


def test_missing_inception_weights_fail_before_training(tmp_path, monkeypatch):
    from lightning_memwatch import FID

    monkeypatch.delenv("LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    watch = make_watch(fid=FID(reference=TRAIN, cache_dir=tmp_path))
    model = ToyDiffusion(TRAIN)
    with pytest.raises(FileNotFoundError, match="LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS") as info:
        make_trainer(tmp_path, [watch], logger=False).fit(model, toy_loader(TRAIN))
    assert r"FID(feature_extractor=" in str(info.value) and "MemWatch(fid=None)" in str(info.value)
    assert model.global_step == 0 and model.sample_calls == 0


def test_data_range_none_is_read_from_the_module(tmp_path):
    model = ToyDiffusion(TRAIN)
    model.data_range = (-2.0, 2.0)
    watch = make_watch(data_range=None)
    make_trainer(tmp_path, [watch], max_steps=10, logger=False).fit(model, toy_loader(TRAIN))
    assert watch.data_range == (-2.0, 2.0) and len(watch.history) == 1
    with pytest.raises(ValueError, match="found no `data_range`"):
        make_trainer(tmp_path, [make_watch(data_range=None)], logger=False).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))


# -- samples against data_range (issue 10, item 1) -----------------------------------------------------
TRAIN01 = (TRAIN + 1) / 2  # training images in [0, 1]


class RangeToy(ToyDiffusion):
    """Samples = per-sample noise mapped by ``fn`` (far from the training images, in whatever range fn says)."""

    def __init__(self, train, fn):
        super().__init__(train)
        self.fn = fn

    def sample(self, num_samples, generator=None, noise=None):
        return self.fn(noise)


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda z: torch.tanh(z) * 0.999, r"\(x \+ 1\) / 2"),  # [-1, 1] samples for [0, 1] data
        (lambda z: 1e6 * torch.sigmoid(z), "diverged"),  # a diverged but finite model
    ],
)
def test_samples_outside_data_range_raise_at_the_first_evaluation(tmp_path, fn, match):
    model = RangeToy(TRAIN01, fn)
    watch = make_watch(data_range=(0.0, 1.0), schedule=EvalSchedule.at([0, 10]))
    with pytest.raises(ValueError, match=r"data_range is \(0, 1\)") as info:
        make_trainer(tmp_path, [watch], logger=False).fit(model, toy_loader(TRAIN01))
    assert match is None or __import__("re").search(match, str(info.value))
    assert watch.history == [] and model.global_step == 0  # at the first evaluation (step 0)


def test_a_small_overshoot_warns_once(tmp_path, recwarn):
    model = RangeToy(TRAIN01, lambda z: torch.sigmoid(z) * 1.12)  # up to ~1.1 for data in [0, 1]
    watch = make_watch(data_range=(0.0, 1.0), schedule=EvalSchedule.at([0, 10, 20]))
    make_trainer(tmp_path, [watch], max_steps=20, logger=False).fit(model, toy_loader(TRAIN01))
    assert len(watch.history) == 3
    overshoot = [w for w in recwarn if "small overshoot" in str(w.message)]
    assert len(overshoot) == 1 and "data_range is (0, 1)" in str(overshoot[0].message)


def test_training_images_using_a_small_part_of_data_range_warn_at_setup(tmp_path):
    quarter = TRAIN01 / 2  # in [0, 0.5]: a quarter of (-1, 1)
    watch = make_watch(data_range=(-1.0, 1.0), schedule=EvalSchedule.at([5]))
    with pytest.warns(UserWarning, match=r"only 25% of data_range \(-1, 1\)"):
        make_trainer(tmp_path, [watch], max_steps=1, logger=False).fit(ToyDiffusion(quarter), toy_loader(quarter))
    assert watch.history == []  # a warning at setup, before any evaluation


def test_verbose_lines_say_where_each_rule_stands(tmp_path, caplog):
    import logging

    watch = make_watch(verbose=True)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [watch], max_steps=20, logger=False).fit(ToyDiffusion(TRAIN), toy_loader(TRAIN))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MemWatch step")]
    assert len(lines) == 2 and "tau_mem: f_mem_ci_low > 0 for 0/1 evaluations" in lines[0]
    assert "tau_gen" in lines[0] and "tau_mem at step 20" in lines[1]


# -- collect_images and the loader's sampler (issue 11) -----------------------------------------------------
def test_collect_images_indexes_exactly_the_rows_the_sampler_can_draw():
    from torch.utils.data import DataLoader, Sampler, SubsetRandomSampler, TensorDataset, WeightedRandomSampler

    data = TensorDataset(TRAIN, torch.zeros(len(TRAIN)))
    train_rows = list(range(0, 64, 2))  # a split of one dataset: the odd rows are held out
    loader = DataLoader(data, batch_size=8, sampler=SubsetRandomSampler(train_rows))
    assert torch.equal(collect_images(loader), TRAIN[train_rows])
    weights = torch.ones(64)
    weights[:10] = 0.0
    weighted = DataLoader(data, batch_size=8, sampler=WeightedRandomSampler(weights, num_samples=64))
    assert torch.equal(collect_images(weighted), TRAIN[10:])

    class EveryThird(Sampler):
        def __iter__(self):
            return iter(range(0, 64, 3))

        def __len__(self):
            return 22

    with pytest.raises(ValueError, match=r"EveryThird.*MemWatch\(train_data="):
        collect_images(DataLoader(data, batch_size=8, sampler=EveryThird()))


def test_a_misspelt_detector_quality_key_fails_at_construction():
    from lightning_memwatch import TimescaleDetector

    with pytest.raises(ValueError, match="Did you mean 'quality'"):
        MemWatch(detector=TimescaleDetector(quality_key="qualty"), metrics={"quality": lambda g: 0.0})
    with pytest.raises(ValueError, match="field of every record"):
        MemWatch(metrics={"f_mem": lambda g: 0.0})
    MemWatch(detector=TimescaleDetector(quality_key="quality"), metrics={"quality": lambda g: 0.0})
    MemWatch(fid=None)  # quality_key 'fid' with FID off: tau_gen does not fire, as documented (no error)

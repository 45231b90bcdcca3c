"""What reaches each logger: scalars everywhere; images (and histograms where supported) through TensorBoard's,
Weights & Biases' and MLflow's image APIs, tested offline (W&B offline mode, MLflow file store, CSV); one hparams
session with MemWatch's settings; pair grids readable at a glance."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import FID, EvalSchedule, MemWatch
from lightning_memwatch import log as mwlog

TRAIN = toy_images(48, seed=5)


class TinyFeatures(torch.nn.Module):
    """A frozen conv feature extractor: images (N, 1, 8, 8) -> (N, 8)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 8, 3)
        self.requires_grad_(False)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class HparamToy(ToyDiffusion):
    def __init__(self, train, memorize_from: int = 10, lr: float = 0.1) -> None:
        super().__init__(train, memorize_from=memorize_from, lr=lr)
        self.save_hyperparameters(ignore=["train"])


def _watch(**kwargs) -> MemWatch:
    defaults = dict(num_samples=24, sample_batch_size=8, schedule=EvalSchedule.every(5), bootstrap=50, verbose=False)
    defaults.update(kwargs)
    return MemWatch(**defaults)


def _trainer(tmp_path, logger, max_steps=10, **kwargs) -> Trainer:
    return Trainer(
        max_steps=max_steps,
        callbacks=kwargs.pop("callbacks"),
        logger=logger,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def _events(run_dir: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        events.extend(EventFileLoader(str(path)).Load())
    return events


def _hparams_sessions(run_dir: Path) -> list[dict]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    sessions = []
    for event in _events(run_dir):
        for value in event.summary.value:
            if value.tag == "_hparams_/session_start_info":
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                sessions.append(dict(data.session_start_info.hparams))
    return sessions


def _scalar_steps(run_dir: Path, tag: str) -> list[int]:
    return [e.step for e in _events(run_dir) for v in e.summary.value if v.tag == tag]


# ------------------------------------------------------------------------------------------------- hparams


def test_one_hparams_session_holds_module_and_memwatch_settings_and_one_hp_metric(tmp_path):
    fid = FID(reference=toy_images(48, seed=6), feature_extractor=TinyFeatures(), cache_dir=tmp_path / "cache")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)  # default_hp_metric=True
    _trainer(tmp_path, logger, callbacks=[_watch(fid=fid)]).fit(HparamToy(TRAIN), toy_loader(TRAIN))
    run = tmp_path / "tb" / "version_0"
    sessions = _hparams_sessions(run)
    assert len(sessions) == 1, f"{len(sessions)} hparams sessions: TensorBoard's HPARAMS view shows one"
    keys = set(sessions[0])
    assert {"lr", "memorize_from"} <= keys  # the module's
    assert {"memwatch/num_samples", "memwatch/threshold", "memwatch/knn_backend", "memwatch/schedule"} <= keys
    assert {"memwatch/fid_extractor", "memwatch/fid_reference_stats", "memwatch/fid_num_reference"} <= keys
    assert sessions[0]["memwatch/fid_reference_stats"].string_value == "computed"  # a cold cache: a miss
    assert _scalar_steps(run, "hp_metric") == [0]
    # the logger is left as it was: a later log_hyperparams call is Lightning's own again
    assert "log_hyperparams" not in vars(logger)


def test_settings_are_logged_once_when_lightning_logs_no_hparams(tmp_path):
    loggers = [TensorBoardLogger(str(tmp_path), name="tb", version=0), CSVLogger(str(tmp_path), name="csv", version=0)]
    trainer = _trainer(tmp_path, loggers, callbacks=[_watch()], enable_autolog_hparams=False)
    trainer.fit(HparamToy(TRAIN), toy_loader(TRAIN))
    sessions = _hparams_sessions(tmp_path / "tb" / "version_0")
    assert len(sessions) == 1 and "memwatch/num_samples" in sessions[0] and "lr" not in sessions[0]
    assert all("log_hyperparams" not in vars(lg) for lg in loggers)
    text = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert "memwatch/threshold" in text


# ------------------------------------------------------------------------------------------ every logger


@pytest.fixture
def offline_loggers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3: the file store is opt-in
    from lightning.pytorch.loggers import MLFlowLogger, WandbLogger

    mlflow = MLFlowLogger(experiment_name="memwatch-test", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="memwatch-test")
    csv_logger = CSVLogger(str(tmp_path), name="csv", version=0)
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    yield {"mlflow": mlflow, "wandb": wandb_logger, "csv": csv_logger, "tb": tb}
    import wandb

    wandb.finish()


def test_scalars_everywhere_images_through_each_image_api(tmp_path, offline_loggers, caplog):
    lg = offline_loggers
    watch = _watch()
    trainer = _trainer(tmp_path, list(lg.values()), max_steps=10, callbacks=[watch])
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        trainer.fit(ToyDiffusion(TRAIN, memorize_from=10), toy_loader(TRAIN))
    assert [r["f_mem"] for r in watch.history] == [0.0, 1.0]

    # CSV: scalars only, and one note saying where the images go
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get(mwlog.F_MEM)]
    assert [(int(r["step"]), float(r[mwlog.F_MEM])) for r in rows] == [(5, 0.0), (10, 1.0)]
    notes = [r.getMessage() for r in caplog.records if "has no image API" in r.getMessage()]
    assert len(notes) == 1 and "CSVLogger" in notes[0]

    # MLflow: scalars by step, both images by key and step, the flag as a run tag
    client, run_id = lg["mlflow"].experiment, lg["mlflow"].run_id
    history = client.get_metric_history(run_id, mwlog.F_MEM)
    assert sorted((m.step, m.value) for m in history) == [(5, 0.0), (10, 1.0)]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    for key in (mwlog.SAMPLES_IMAGE, mwlog.PAIRS_IMAGE):
        stem = key.replace("/", "~")
        assert sum(p.split("/")[-1].startswith(f"{stem}+step+") and p.endswith(".png") for p in images) == 2, key
    assert "tau_mem" in client.get_run(run_id).data.tags[mwlog.TIMESCALE_TEXT]
    assert client.get_run(run_id).data.params["memwatch/num_samples"] == "24"

    # W&B (offline): image files in the run's media folder, the histogram and the scalars in its summary
    run = lg["wandb"].experiment
    summary = run.summary
    assert summary[mwlog.F_MEM] == 1.0 and summary[mwlog.TAU_MEM] == 10.0
    assert summary[mwlog.RATIO_HISTOGRAM]["_type"] == "histogram"
    assert summary[mwlog.PAIRS_IMAGE]["_type"] == "images/separated"
    media = Path(run.dir) / "media" / "images" / "memwatch"
    names = [p.name for p in media.glob("*.png")]
    assert sum(n.startswith("generated_vs_nearest_train_") for n in names) == 2
    assert sum(n.startswith("generated_") and "vs_nearest" not in n for n in names) == 2
    assert run.config["memwatch/threshold"] == pytest.approx(1 / 3)

    # TensorBoard: images, the histogram
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert {mwlog.SAMPLES_IMAGE, mwlog.PAIRS_IMAGE} <= set(acc.Tags()["images"])
    assert [e.step for e in acc.Histograms(mwlog.RATIO_HISTOGRAM)] == [5, 10]
    pairs = acc.Images(mwlog.PAIRS_IMAGE)[-1]
    assert pairs.height >= 2 * 64 and pairs.width >= 8 * 64  # 8x8 digits shown at 64 px, not a strip of pixels


# ---------------------------------------------------------------------------------------------- pair grid


def test_pair_grid_upscales_without_smoothing_and_labels_each_pair():
    gen = torch.zeros(3, 1, 8, 8)
    gen[:, :, :4] = 1.0  # top half white, bottom half black: a sharp edge
    train = torch.full((3, 1, 8, 8), 0.5)
    ratios = torch.tensor([0.05, 0.2, 0.9])
    image = mwlog.pair_grid(gen, train, ratios, threshold=1 / 3)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    pad = 6
    tile = image[pad : pad + 64, pad : pad + 64]  # the first generated sample, upscaled 8x to 64 px
    assert (tile[:32] == 255).all() and (tile[32:] == 0).all()  # nearest neighbour: no grey ramp at the edge
    below = image[pad + 64 + 2 : pad + 128 + 2, pad : pad + 64]
    assert (below == 128).all()  # its nearest training image, same size, under it
    label_rows = image[pad + 130 : pad + 130 + 14]
    cell = 64 + pad
    red = (label_rows[..., 0] > 150) & (label_rows[..., 1] < 80)
    dark = label_rows.max(axis=2) < 100
    assert red[:, :cell].any() and red[:, cell : 2 * cell].any()  # 0.05 and 0.2 are copies: red labels
    assert not red[:, 2 * cell :].any() and dark[:, 2 * cell :].any()  # 0.9: a black label


def test_logged_pairs_are_most_memorized_first(tmp_path, monkeypatch):
    seen = {}

    def spy(generated, nearest, ratios, threshold=None):
        seen["ratios"], seen["threshold"] = ratios.clone(), threshold
        return np.zeros((4, 4, 3), dtype=np.uint8)

    monkeypatch.setattr(mwlog, "pair_grid", spy)
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)

    class FakeTrainer:
        loggers = [logger]

    gen = toy_images(20, seed=7)
    ratios = torch.rand(20, generator=torch.Generator().manual_seed(0))
    mwlog.log_images(FakeTrainer(), 3, gen, ratios, gen, (-1.0, 1.0), max_pairs=5, threshold=0.3)  # type: ignore[arg-type]
    assert torch.equal(seen["ratios"], torch.sort(ratios).values[:5]) and seen["threshold"] == 0.3

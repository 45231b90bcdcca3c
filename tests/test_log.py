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


def _experiment_metrics(run_dir: Path) -> list[str]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    for event in _events(run_dir):
        for value in event.summary.value:
            if value.tag == "_hparams_/experiment":
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                return [m.name.tag for m in data.experiment.metric_infos]
    return []


def test_hparams_tab_without_default_hp_metric_lists_memwatch_scalars_as_metrics(tmp_path):
    """``default_hp_metric=False`` (the demo's logger) writes no session in Lightning; MemWatch's does, one, with
    its scalars as the tab's metrics and no ``hp_metric``; the patch is the watch's and ends with the fit."""
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0, default_hp_metric=False)
    watch = _watch()
    _trainer(tmp_path, logger, callbacks=[watch]).fit(HparamToy(TRAIN), toy_loader(TRAIN))
    run = tmp_path / "tb" / "version_0"
    sessions = _hparams_sessions(run)
    assert len(sessions) == 1 and {"lr", "memwatch/num_samples", "memwatch/detector_mem_rule"} <= set(sessions[0])
    metrics = _experiment_metrics(run)
    assert {mwlog.F_MEM, mwlog.F_MEM_CI_LOW, mwlog.TAU_MEM} <= set(metrics) and "hp_metric" not in metrics
    assert _scalar_steps(run, "hp_metric") == []
    assert "log_hyperparams" not in vars(logger) and watch._hparams is None
    assert watch.hparams()["memwatch/num_train"] == len(TRAIN)  # what was built, read after the fit
    with pytest.warns(DeprecationWarning, match=r"watch.hparams\(\)"):
        assert mwlog.memwatch_settings(watch) == watch.hparams()


def test_custom_scalars_layout_and_its_guide_lines(tmp_path):
    from lightning_memwatch import TimescaleDetector, tensorboard_layout

    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    detector = TimescaleDetector(mem_rule="threshold", f0=0.1)
    _trainer(tmp_path, logger, callbacks=[_watch(detector=detector)]).fit(HparamToy(TRAIN), toy_loader(TRAIN))
    run = tmp_path / "tb" / "version_0"
    evaluated = _scalar_steps(run, mwlog.F_MEM)
    assert evaluated and _scalar_steps(run, tensorboard_layout.F0_LINE) == evaluated  # a line: every evaluation
    assert _scalar_steps(run, tensorboard_layout.TAU_MEM_MARK) == evaluated
    configs = [v for e in _events(run) for v in e.summary.value if v.tag == "custom_scalars__config__"]
    assert len(configs) == 1
    charts = tensorboard_layout.layout(detector)[tensorboard_layout.CATEGORY]
    assert any("f_mem against f0" in title for title in charts)  # the rule's own tested value (threshold rule)
    assert charts[next(t for t in charts if t.startswith("f_mem (fraction"))] == [
        "Margin", [mwlog.F_MEM, mwlog.F_MEM_CI_LOW, mwlog.F_MEM_CI_HIGH]
    ]


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
    assert pairs.height >= 2 * 64 and pairs.width >= 4 * 64  # 8x8 digits shown at 64 px, not a strip of pixels
    # the pairs' legend beside them, as a text entry (the TEXT tab)
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    texts = [
        v.tensor.string_val[0].decode()
        for path in (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*")
        for e in EventFileLoader(str(path)).Load()
        for v in e.summary.value
        if v.tag.startswith(mwlog.PAIRS_CAPTION)
    ]
    assert texts and "nearest training image (bottom)" in texts[-1]


# ---------------------------------------------------------------------------------------------- pair grid


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def test_pair_grid_upscales_without_smoothing_and_labels_each_pair():
    gen = torch.zeros(3, 3, 8, 8)
    gen[:, 1] = 0.8  # green (no text pixel is green)
    gen[:, 1, :4] = 0.2  # top half dark green, bottom half light green: a sharp edge
    train = torch.zeros(3, 3, 8, 8)
    train[:, 2] = 0.5  # blue
    ratios = torch.tensor([0.05, 0.2, 0.9])
    image = mwlog.pair_grid(gen, train, ratios, threshold=1 / 3)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    green = (image[..., 0] == 0) & (image[..., 2] == 0)
    top, _, left, _ = _box(green & (image[..., 1] == 51))  # the generated samples' top halves
    tile = image[top : top + 64, left : left + 64, 1]  # the first generated sample, upscaled 8x to 64 px
    assert (tile[:32] == 51).all() and (tile[32:] == 204).all()  # nearest neighbour: no ramp at the edge
    t_top, _, t_left, _ = _box((image[..., 2] == 128) & (image[..., 0] == 0))
    assert t_left == left and t_top == top + 64 + 2  # its nearest training image, same size, under it
    below = image[t_top + 64 :]
    red = (below[..., 0] > 150) & (below[..., 1] < 80)
    dark = below.max(axis=2) < 100
    step = image.shape[1] - left  # the three pair columns, then the image's edge
    cols = [slice(left + i * step // 3, left + (i + 1) * step // 3) for i in range(3)]
    assert red[:, cols[0]].any() and red[:, cols[1]].any()  # 0.05 and 0.2 are copies: red labels
    assert not red[:, cols[2]].any() and dark[:, cols[2]].any()  # 0.9: a black label


def test_pair_grid_has_a_header_and_row_labels_readable_on_a_card():
    """The legend is in the image: a header row above the pairs (the threshold named) and row labels left of
    them, with text large enough to read once TensorBoard scales the image to a ~380 px card."""
    gen, train = torch.zeros(16, 3, 8, 8), torch.zeros(16, 3, 8, 8)
    gen[:, 1], train[:, 2] = 0.2, 0.5  # green over blue
    image = mwlog.pair_grid(gen, train, torch.linspace(0.1, 0.9, 16), threshold=1 / 3)
    top, _, left, _ = _box((image[..., 1] == 51) & (image[..., 0] == 0) & (image[..., 2] == 0))
    ink = image.max(axis=2) < 100  # black text
    header_rows = np.nonzero(ink[:top].any(axis=1))[0]
    assert len(header_rows) > 0 and ink[:, :left].any()  # the header row and the row labels
    text_px = header_rows.max() - header_rows.min() + 1  # cap height to descender of the header line
    # TensorBoard fits the image into its card's image box, about 370 x 210 px at the default card width
    shown = text_px * min(370 / image.shape[1], 210 / image.shape[0])
    assert shown >= 11, (text_px, image.shape)
    caption = mwlog.pair_caption(16, 1 / 3)
    assert "generated sample (top)" in caption and "nearest training image (bottom)" in caption
    assert "d1/d2 < 1/3" in caption


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

"""MemWatch's sharded nearest-neighbour index under DDP (knn_sharding) equals one process's records."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from toys import ToyDiffusion, toy_images, toy_loader

from lightning_memwatch import EvalSchedule, MemWatch, NearestNeighbourIndex

SCRIPT = Path(__file__).with_name("_ddp_memwatch_sharded.py")
KNN_FIELDS = (
    "step", "num_samples", "f_mem", "f_mem_ci_low", "f_mem_ci_high",
    "ratio_q05", "ratio_q25", "ratio_median", "ratio_q75", "ratio_q95",
)  # fmt: skip


def _script():
    spec = importlib.util.spec_from_file_location("_ddp_memwatch_sharded", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reports(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _pair_grids(out: Path) -> list[bytes]:
    """The encoded nearest-neighbour pair grids rank 0 logged (they show the nearest training images)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_memwatch.log import PAIRS_IMAGE

    acc = EventAccumulator(str(out / "tb" / "version_0"))
    acc.Reload()
    return [image.encoded_image_string for image in acc.Images(PAIRS_IMAGE)]


def _fit_in_parallel(tmp_path: Path, modes: dict[str, list[str]], features: bool) -> None:
    """The 2-process runs (``modes``: name -> script arguments) in the background, the one-process run here."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(SCRIPT), str(tmp_path / name), "2", *args],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        for name, args in modes.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_num_threads(1)
        _script().run(tmp_path / "single", 1, "auto", features=features)
    for name, proc in runs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{output[-4000:]}"


def _knn(report: dict) -> list[list]:
    return [[r[k] for k in KNN_FIELDS] for r in report["history"]]


def test_knn_sharding_is_validated():
    with pytest.raises(ValueError, match=r"knn_sharding must be one of 'auto', 'sharded', 'rank0'; got 'shard'"):
        MemWatch(knn_sharding="shard")
    with pytest.raises(ValueError, match="knn_sharding must be one of"):
        MemWatch(knn_sharding=True)
    assert MemWatch(knn_sharding="rank0").knn_sharding == "rank0"


def test_sharded_in_one_process_builds_the_one_index(tmp_path):
    from lightning.pytorch import Trainer

    train = toy_images(32)
    watch = MemWatch(
        train_data=train, num_samples=8, sample_batch_size=8, schedule=EvalSchedule.every(4), bootstrap=50,
        verbose=False, knn_sharding="sharded",
    )  # fmt: skip
    trainer = Trainer(
        max_steps=4, accelerator="cpu", devices=1, callbacks=[watch], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ToyDiffusion(train, memorize_from=2), toy_loader(train))
    assert type(watch.index) is NearestNeighbourIndex and watch.index.num_train == 32
    assert [r.f_mem for r in watch.history] == [1.0]  # exact copies after step 2


@pytest.mark.slow
def test_ddp_sharded_records_equal_one_process(tmp_path):
    """2 gloo processes, sharded (default) and rank0, against one process with the same seeds.

    Equal by construction: the samples are drawn from the same per-sample seeds and gathered in index order;
    every pixel is dyadic, so each squared distance is exact in any summation order and the sharded search
    (exact, ties to the lower global row) returns the same d1, d2 as one process's index; f_mem, its interval
    (seeded bootstrap of the same count) and the ratio quantiles follow from them. FID and the user metric
    run on rank 0 on the same gathered samples.
    """
    _fit_in_parallel(tmp_path, {"auto": ["auto"], "rank0": ["rank0"]}, features=False)
    [single] = _reports(tmp_path / "single", 1)
    sharded, rank0 = _reports(tmp_path / "auto", 2), _reports(tmp_path / "rank0", 2)
    assert single["index"] == "NearestNeighbourIndex" and len(single["history"]) == 2

    f_mem = [r["f_mem"] for r in single["history"]]
    assert 0 < f_mem[0] < f_mem[1] < 1  # a mix of memorized and new samples, more of the first later
    for report in (*sharded, *rank0):
        assert _knn(report) == _knn(single)
        for got, want in zip(report["history"], single["history"], strict=True):
            assert got["fid"] == pytest.approx(want["fid"], rel=1e-6)
            assert got["metrics"] == pytest.approx(want["metrics"], rel=1e-12)
        assert report["fid_train_floor"] == pytest.approx(single["fid_train_floor"], rel=1e-6)
    assert sharded[0]["history"] == sharded[1]["history"]  # rank 0's record, broadcast
    # sharded: each rank read and indexed only its block of the 41 rows (21 + 20)
    assert [r["index"] for r in sharded] == ["ShardedNearestNeighbourIndex"] * 2
    assert [r["shard_rows"] for r in sharded] == [21, 20]
    assert sharded[0]["read"] == list(range(21)) and sharded[1]["read"] == list(range(21, 41))
    assert [r["num_train"] for r in sharded] == [41, 41]
    # rank0: rank 0 alone reads the training set and holds the one index; the other ranks read nothing
    assert [r["index"] for r in rank0] == ["NearestNeighbourIndex", None]
    assert rank0[0]["read"] == list(range(41)) and rank0[1]["read"] == []
    # the pair grids show the same nearest training images (through the sharded index's train_images)
    grids = _pair_grids(tmp_path / "single")
    assert len(grids) == 2 and _pair_grids(tmp_path / "auto") == grids == _pair_grids(tmp_path / "rank0")


@pytest.mark.slow
def test_ddp_sharded_feature_space_with_a_duplicate(tmp_path):
    """feature_fn and a training image duplicated across the shards: the shards hold features and drop the
    copy, so each rank keeps its block of images for the pair grid and the FID train floor (a collective).
    Equal to one process by the same construction as above (the features are dyadic too)."""
    _fit_in_parallel(tmp_path, {"auto": ["auto", "features"]}, features=True)
    [single] = _reports(tmp_path / "single", 1)
    sharded = _reports(tmp_path / "auto", 2)
    assert single["num_train"] == 40 and single["num_duplicates"] == 1
    for report in sharded:
        assert (report["num_train"], report["num_duplicates"], report["keeps_block"]) == (40, 1, True)
        assert _knn(report) == _knn(single)
        assert report["fid_train_floor"] == pytest.approx(single["fid_train_floor"], rel=1e-6)
        for got, want in zip(report["history"], single["history"], strict=True):
            assert got["fid"] == pytest.approx(want["fid"], rel=1e-6)
    assert [r["read"] for r in sharded] == [list(range(21)), list(range(21, 41))]
    # rank 0's block spans half of data_range, the whole set all of it: the range-use check judges the whole set
    for report in (single, *sharded):
        assert not [w for w in report["warnings"] if "of data_range" in w and "only" in w]
    grids = _pair_grids(tmp_path / "single")
    assert len(grids) == 2 and _pair_grids(tmp_path / "auto") == grids

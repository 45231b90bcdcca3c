"""MemWatch under 1 or 2 CPU processes (gloo) with a given ``knn_sharding``; each rank writes a JSON report.

Usage: python _ddp_memwatch_sharded.py OUTDIR DEVICES SHARDING [features]   (launched by test_memwatch_sharded.py;
Lightning re-runs it once per rank; the test calls ``run(out, 1, ...)`` in its own process). Every pixel and
sample value is a multiple of 2**-7 in [-1, 1], so every squared distance (and its partial sums, of 64 terms
below 4) is exact whatever the order of summation: one process and the shards must give bit-identical
distances, by construction.
"""

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from toys import ToyDiffusion, toy_loader  # noqa: E402

from lightning_memwatch import FID, EvalSchedule, MemWatch  # noqa: E402

NUM_TRAIN = 41  # odd: shards of 21 and 20 rows


def dyadic_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, (n, 1, 8, 8), generator=gen).float() / 128


class RecordingDataset(Dataset):
    """The training images, noting which rows were read (MemWatch's reads only: training reads another set)."""

    def __init__(self, images):
        self.images, self.read = images, set()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.images[i], 0


class NearCopies(ToyDiffusion):
    """Sample i: a training image plus a dyadic perturbation, small for about a third of the samples (memorized)
    and large for the rest; all perturbations shrink after ``memorize_from`` steps."""

    def sample(self, num_samples, generator=None, noise=None):
        self.sample_calls += 1
        flat = noise.flatten(1)
        pick = (flat[:, 0].abs() * 1e4).long() % len(self.train_images)
        scale = torch.where(flat[:, 1].abs() > 1.0, 2.0, 72.0) / (1 if self.global_step < self.memorize_from else 2)
        step = torch.round(noise * scale.view(-1, 1, 1, 1)) / 128
        return (self.train_images[pick] + step).clamp(-1, 127 / 128)


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.requires_grad_(False)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


class Report(Callback):
    def __init__(self, watch, dataset, out):
        self.watch, self.dataset, self.out = watch, dataset, out
        self.read_at_fit_start = None

    def on_fit_start(self, trainer, pl_module):  # after MemWatch's setup and on_fit_start (it comes first)
        self.read_at_fit_start = sorted(self.dataset.read)

    def on_train_end(self, trainer, pl_module):
        index = self.watch.index
        report = {
            "history": [r.to_dict() for r in self.watch.history],
            "read": self.read_at_fit_start,
            "index": None if index is None else type(index).__name__,
            "shard_rows": getattr(index, "shard_rows", None),
            "num_train": None if index is None else index.num_train,
            "fid_train_floor": self.watch.fid_train_floor,
            "keeps_block": self.watch._train.block is not None,
            "num_duplicates": getattr(index, "num_duplicates", None),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def double_pixels(x: torch.Tensor) -> torch.Tensor:
    """A feature map that keeps every value dyadic (exact distances in any order)."""
    return 2 * x.flatten(1)


def run(out: Path, devices: int, sharding: str, features: bool = False) -> None:
    """One fit; each rank writes ``out/rank{r}.json`` (with the warnings it raised). ``features``: feature-space
    neighbours (``feature_fn``), rank 0's block of rows at half the range of the others, and a training image
    duplicated across the shards (the index then holds features and
    drops the copy, so MemWatch keeps each rank's block of images for the pair grid and the FID train floor)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train = dyadic_images(NUM_TRAIN, seed=0)
    if features:
        # rank 0's block spans half of data_range, the whole set all of it: no "small part of data_range" warning
        train[:21] /= 2
        train[30] = train[3]  # rank 0's row 3 again in rank 1's block
    dataset = RecordingDataset(train)
    fid = FID(reference=dyadic_images(24, seed=1), feature_extractor=TinyFeatures(), num_samples=24, cache=False)
    watch = MemWatch(
        train_data=dataset,
        num_samples=24,
        sample_batch_size=6,
        schedule=EvalSchedule.every(4),
        bootstrap=200,
        fid=fid,
        metrics={"mean_pixel": lambda x: float(x.double().mean())},
        verbose=False,
        knn_sharding=sharding,
        feature_fn=double_pixels if features else None,
    )
    trainer = Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[watch, Report(watch, dataset, out)],
        logger=TensorBoardLogger(str(out / "tb"), name="", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(NearCopies(train, memorize_from=6), toy_loader(train.clone(), batch_size=8))
    report = out / f"rank{trainer.global_rank}.json"
    written = json.loads(report.read_text())
    written["warnings"] = [str(w.message) for w in caught]
    report.write_text(json.dumps(written))


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], features=sys.argv[4:] == ["features"])
    if torch.distributed.is_initialized():  # a gloo group left to interpreter exit can abort it at exit
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception")

"""One fit of MemWatch + MemorizationEarlyStopping, checkpointing every epoch; launched by test_kill_resume.py.

Usage: python _kill_resume_fit.py OUTDIR [--hang-at STEP] [--resume CKPT]

* ``--hang-at STEP``: at optimizer step STEP (between two checkpoints) write ``OUTDIR/hanging`` and sleep, so
  the test can SIGKILL the process mid-run: no teardown, no exception hook, nothing flushed.
* ``--resume CKPT``: resume from that checkpoint.

Writes ``OUTDIR/weights_<step>.pt`` (the module's weights at every evaluation, from the listener) and, at
the end of the fit, ``OUTDIR/result.json`` (history, flags, stopper state) and ``OUTDIR/final.pt``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector

MEMORIZE_FROM = 40  # samples are copies of training images from this optimizer step on
QUALITY = {5: 10.0, 10: 5.0, 15: 1.05, 20: 1.0, 25: 0.95, 30: 1.02, 35: 0.99, 40: 0.5, 45: 0.4, 50: 0.3}
TRAIN = torch.rand((48, 1, 6, 6), generator=torch.Generator().manual_seed(0)) * 2 - 1
BATCH = 8  # 6 optimizer steps per epoch
CKPT_EVERY = 6  # one checkpoint per epoch: resumes start at an epoch boundary


class EpochShuffle(Sampler[int]):
    """A shuffle that depends on the epoch only (Lightning calls ``set_epoch``), as DistributedSampler does:
    a resumed run sees the same batches as an uninterrupted one, whatever the global RNG did before."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=gen).tolist())

    def __len__(self) -> int:
        return self.n


class CopyingToy(LightningModule):
    """Trains a linear layer (momentum SGD: optimizer state matters at resume); samples copies from
    ``MEMORIZE_FROM`` on, before that images about equally far from every training image."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("train_images", TRAIN.clone())
        self.layer = torch.nn.Linear(TRAIN[0].numel(), 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0].flatten(1)).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def sample(self, num_samples, generator=None, noise=None):
        if self.global_step < MEMORIZE_FROM:
            return torch.sign(noise) * 0.999
        pick = (noise.flatten(1)[:, 0].abs() * 1e4).long() % len(self.train_images)
        return self.train_images[pick].clone()


class HangAt(Callback):
    def __init__(self, step: int, out: Path) -> None:
        self.step, self.out = step, out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            (self.out / "hanging").write_text(str(trainer.global_step))
            time.sleep(600)  # the test kills the process here


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--hang-at", type=int)
    parser.add_argument("--resume")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = CopyingToy()
    watch = MemWatch(
        train_data=TRAIN,  # the loader's custom sampler: MemWatch asks for the rows explicitly
        num_samples=24, sample_batch_size=12, schedule=EvalSchedule.every(5), bootstrap=100, verbose=False,
        log_images=False, metrics={"quality": lambda generated: QUALITY[model.global_step]},
        detector=TimescaleDetector(quality_key="quality", floor=1.0),
    )  # fmt: skip
    watch.add_listener(
        lambda trainer, pl_module, record: torch.save(pl_module.state_dict(), out / f"weights_{record['step']}.pt")
    )
    stopper = MemorizationEarlyStopping(watch, dirpath=str(out / "best"))
    callbacks = [watch, stopper, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=CKPT_EVERY, save_top_k=-1)]
    if args.hang_at is not None:
        callbacks.append(HangAt(args.hang_at, out))
    trainer = Trainer(
        max_steps=100, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(out),
    )  # fmt: skip
    loader = DataLoader(
        TensorDataset(TRAIN, torch.zeros(len(TRAIN))), batch_size=BATCH, sampler=EpochShuffle(len(TRAIN))
    )
    trainer.fit(model, loader, ckpt_path=args.resume)

    history = [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in watch.history]
    result = {
        "global_step": trainer.global_step,
        "history": history,
        "tau_gen": watch.tau_gen,
        "tau_mem": watch.tau_mem,
        "stopped_step": stopper.stopped_step,
        "best_step": stopper.best_step,
        "best_score": stopper.best_score,
        "restored_step": stopper.restored_step,
        "stopping_reason": stopper.stopping_reason.value,
        "copies": watch.state_dict()["copies"],  # the copied-training-images table
    }
    (out / "result.json").write_text(json.dumps(result, indent=1))
    torch.save(model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    sys.exit(main())

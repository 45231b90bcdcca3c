"""Run MemWatch on a toy module with 1 or 2 CPU processes (gloo); each rank writes its history as JSON.

Usage: python _ddp_memwatch.py OUTDIR DEVICES   (launched by test_memwatch.py; Lightning re-runs it per rank)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from toys import ToyDiffusion, toy_images, toy_loader  # noqa: E402

from lightning_memwatch import EvalSchedule, MemWatch  # noqa: E402


class DumpHistory(Callback):
    def __init__(self, watch, out):
        self.watch, self.out = watch, out

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps([r.to_dict() for r in self.watch.history]))


def main():
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    train = toy_images(64)
    watch = MemWatch(
        num_samples=30, sample_batch_size=4, schedule=EvalSchedule.every(8), bootstrap=100, verbose=False
    )
    trainer = Trainer(
        max_steps=16,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[watch, DumpHistory(watch, out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ToyDiffusion(train, memorize_from=12), toy_loader(train, batch_size=8))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a gloo group left to interpreter exit can abort it at exit
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception")

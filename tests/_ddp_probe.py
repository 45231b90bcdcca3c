"""Run LossGapProbe on a tiny DDPM with 1 or 2 CPU processes (gloo); each rank writes its readings as JSON.

Usage: python _ddp_probe.py OUTDIR DEVICES   (launched by test_probe.py; Lightning re-runs it per rank)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from toys import toy_images, toy_loader  # noqa: E402

from lightning_memwatch.apps.models import DDPM, ResidualMLP  # noqa: E402
from lightning_memwatch.callbacks.probe import LossGapProbe  # noqa: E402


class DumpReadings(Callback):
    def __init__(self, probe, out):
        self.probe, self.out = probe, out

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps([r.to_dict() for r in self.probe.history]))


def main():
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    train, heldout = toy_images(32, seed=0), toy_images(40, seed=1)
    probe = LossGapProbe(heldout_data=heldout, train_data=train, num_triples=33, every_n_train_steps=4)
    model = DDPM(ResidualMLP(dim=64, width=16, num_blocks=1), optimizer="adam", lr=1e-2)
    trainer = Trainer(
        max_steps=8,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        callbacks=[probe, DumpReadings(probe, out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, toy_loader(train, batch_size=8))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a gloo group left to interpreter exit can abort it at exit
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception")

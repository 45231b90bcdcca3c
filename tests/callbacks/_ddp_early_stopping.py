"""2-process CPU DDP (gloo) run of MemWatch + MemorizationEarlyStopping; each rank writes its outcome as JSON.

Usage: python _ddp_early_stopping.py OUTDIR DEVICES   (launched by test_early_stopping.py; Lightning re-runs
it once per extra rank)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from test_early_stopping import (  # noqa: E402
    CopyingToy,
    loader,
    real_watch,
    same_weights,
    snapshot_listener,
)

from lightning_memwatch.callbacks.early_stopping import MemorizationEarlyStopping  # noqa: E402


class Dump(Callback):
    def __init__(self, watch, stopper, snapshots, out):
        self.watch, self.stopper, self.snapshots, self.out = watch, stopper, snapshots, out

    def on_fit_end(self, trainer, pl_module):  # after the stopper's on_train_end restored the weights
        result = {
            "global_step": trainer.global_step,
            "stopped_step": self.stopper.stopped_step,
            "tau_gen": self.watch.tau_gen,
            "tau_mem": self.watch.tau_mem,
            "best_step": self.stopper.best_step,
            "restored_step": self.stopper.restored_step,
            "weights_are_step_25": same_weights(pl_module.state_dict(), self.snapshots[25]),
            "stopping_reason": self.stopper.stopping_reason.value,
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main():
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = CopyingToy()
    watch, snapshots = real_watch(model), {}
    watch.add_listener(snapshot_listener(snapshots))
    stopper = MemorizationEarlyStopping(watch, dirpath=str(out / "best"))
    trainer = Trainer(
        max_steps=100, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        callbacks=[watch, stopper, Dump(watch, stopper, snapshots, out)], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader())


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a gloo group left to interpreter exit can abort it at exit
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception")

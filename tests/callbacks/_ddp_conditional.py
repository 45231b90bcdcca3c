"""A class-conditional MemWatch fit on 1 or 2 CPU processes (gloo); each rank writes its copy table, per-class
records, per-class flags and the labels its sampler received as JSON.

Usage: python _ddp_conditional.py OUTDIR DEVICES [KNN_SHARDING]   (launched by tests/test_conditional.py)
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from toys import ConditionalCopier, toy_images, toy_labelled_loader  # noqa: E402

from lightning_memwatch import EvalSchedule, MemWatch  # noqa: E402


class Pairs(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]


class Dump(Callback):
    def __init__(self, watch, out):
        self.watch, self.out = watch, out

    def on_train_end(self, trainer, pl_module):
        self.out.mkdir(parents=True, exist_ok=True)
        result = {
            "copies": self.watch.state_dict()["copies"],
            "per_class": [{k: c.to_dict() for k, c in r.per_class.items()} for r in self.watch.history],
            "class_tau_mem": [str(k) for k in self.watch.detector.class_tau_mem],
            "labels": torch.cat(pl_module.seen_labels[: len(pl_module.seen_labels) // 2]).tolist(),
        }
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def main():
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    sharding = sys.argv[3] if len(sys.argv) > 3 else "auto"  # "rank0": rank 0 reads the labels, broadcasts them
    torch.manual_seed(0)
    train, labels = toy_images(60), torch.arange(60) % 5
    watch = MemWatch(num_samples=100, sample_batch_size=10, schedule=EvalSchedule.every(8), bootstrap=100,
                     verbose=False, knn_sharding=sharding)  # fmt: skip
    trainer = Trainer(
        max_steps=16, accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        callbacks=[watch, Dump(watch, out)], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = ConditionalCopier(train, labels, copying=(3,), memorize_from=8)
    # a Dataset of (image, label) items, not a TensorDataset: its labels are read beside the images (one pass)
    loader = toy_labelled_loader(train, labels, batch_size=8)
    trainer.fit(model, DataLoader(Pairs(loader.dataset), batch_size=8, shuffle=True))


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # a gloo group left to interpreter exit can abort it at exit
        torch.distributed.destroy_process_group()  # ("terminate called without an active exception")

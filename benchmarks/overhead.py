"""What does MemWatch cost? One evaluation split into sampling vs everything else, and training wall time.

Run: ``python benchmarks/overhead.py`` (CPU defaults: a tiny U-Net, short DDIM) or, on a GPU,
``python benchmarks/overhead.py --width 32 --num-samples 2048 --sample-steps 100 --train-size 32768``.

Prints, from one run:
  1. per evaluation: sampling seconds, metric seconds (kNN query + f_mem bootstrap + FID features and distance +
     image/histogram logging) and their ratio (target: metrics <= 10% of sampling);
  2. training: seconds per step without the callback, with a MemWatch whose schedule never fires (its cost on the
     training step itself, target ~0), and with a realistic schedule, minus the time spent in evaluations.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_memwatch import FID, EvalSchedule, MemWatch
from lightning_memwatch.apps.models.ddpm import DDPM
from lightning_memwatch.apps.models.unet import UNet


class StepTimer(Callback):
    """Wall time from the first to the last training batch (excludes set-up and index building)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "start"):
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


class ConvFeatures(torch.nn.Module):
    """A small frozen conv encoder standing in for Inception on CPU (images -> 64-d features)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, stride=2), torch.nn.SiLU(), torch.nn.Conv2d(32, 64, 3, stride=2)
        )
        self.requires_grad_(False)

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def build(args: argparse.Namespace) -> tuple[DDPM, DataLoader, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    train = torch.rand((args.train_size, 1, args.size, args.size), generator=gen) * 2 - 1
    unet = UNet(base_width=args.width, in_channels=1)
    model = DDPM(unet, optimizer="adam", lr=1e-4, sample_steps=args.sample_steps, data_range=(-1.0, 1.0))
    loader = DataLoader(TensorDataset(train), batch_size=args.batch_size, shuffle=True)
    return model, loader, train


def fit(args, callbacks, max_steps, logdir=None) -> float:
    model, loader, _ = build(args)
    timer = StepTimer()
    logger = TensorBoardLogger(logdir, name="bench") if logdir else False
    trainer = Trainer(
        max_steps=max_steps, accelerator="auto", devices=1, callbacks=[*callbacks, timer], logger=logger,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return timer.seconds


def make_watch(args, train, schedule) -> MemWatch:
    fid = None
    if args.fid != "off":
        extractor = "inception" if args.fid == "inception" else ConvFeatures(1)
        fid = FID(reference=train[: args.num_samples], feature_extractor=extractor, cache=False)
    return MemWatch(
        train_data=train, num_samples=args.num_samples, sample_batch_size=args.sample_batch_size,
        schedule=schedule, fid=fid, verbose=False,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=8, help="U-Net base width W (paper: 32)")
    p.add_argument("--size", type=int, default=32, help="image side (pixels)")
    p.add_argument("--train-size", type=int, default=4096, help="training images n")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=256, help="samples per evaluation")
    p.add_argument("--sample-batch-size", type=int, default=256)
    p.add_argument("--sample-steps", type=int, default=20, help="DDIM timesteps (paper: 100)")
    p.add_argument("--fid", choices=["conv", "inception", "off"], default="conv")
    p.add_argument("--steps", type=int, default=40, help="training steps per timing run")
    p.add_argument("--every", type=int, default=20, help="evaluation period of the realistic schedule")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, train = build(args)
    print(f"device={'cuda' if torch.cuda.is_available() else 'cpu'} threads={torch.get_num_threads()} "
          f"U-Net W={args.width} {args.size}x{args.size} n={args.train_size} samples={args.num_samples} "
          f"DDIM steps={args.sample_steps} FID={args.fid}")

    # 1. one evaluation, split
    with tempfile.TemporaryDirectory() as logdir:
        watch = make_watch(args, train, EvalSchedule.at(range(1, 2 + args.repeats)))
        fit(args, [watch], max_steps=1 + args.repeats, logdir=logdir)
    sample_s = statistics.median(r["sample_seconds"] for r in watch.history)
    metric_s = statistics.median(r["metric_seconds"] for r in watch.history)
    print("\n| evaluation part | seconds (median) | / sampling |")
    print("|---|---|---|")
    print(f"| sampling ({args.num_samples} images) | {sample_s:.3f} | 1.00 |")
    print(f"| everything else (kNN, f_mem CI, FID, images) | {metric_s:.3f} | {metric_s / sample_s:.3f} |")
    print(f"target: everything else <= 0.10 x sampling -> {'met' if metric_s <= 0.1 * sample_s else 'NOT met'}")

    # 2. training wall time, alternating runs so drift hits every variant alike
    never = EvalSchedule.at([10**12])
    realistic = EvalSchedule.every(args.every)
    # "without, again" closes each round: the spread between the two baselines is the noise floor.
    times: dict[str, list[float]] = {"without": [], "never fires": [], "realistic": [], "without, again": []}
    eval_seconds: list[float] = []
    for _ in range(args.repeats):
        times["without"].append(fit(args, [], args.steps))
        times["never fires"].append(fit(args, [make_watch(args, train, never)], args.steps))
        watch = make_watch(args, train, realistic)
        total = fit(args, [watch], args.steps)
        spent = sum(r["sample_seconds"] + r["metric_seconds"] for r in watch.history)
        times["realistic"].append(total - spent)
        eval_seconds.append(spent)
        times["without, again"].append(fit(args, [], args.steps))
    base = statistics.median(times["without"])
    print(f"\n| training ({args.steps} steps) | seconds per step | / without |")
    print("|---|---|---|")
    for name, values in times.items():
        label = name if name != "realistic" else f"realistic (every {args.every}), evaluations subtracted"
        t = statistics.median(values)
        print(f"| {label} | {t / args.steps:.4f} | {t / base:.3f} |")
    print(f"(evaluations in the realistic run took {statistics.median(eval_seconds):.2f} s)")


if __name__ == "__main__":
    main()

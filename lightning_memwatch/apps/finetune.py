"""``memwatch demo --finetune``: fine-tune a pretrained diffusion model on a few images and stop before it copies.

The use case users ask about most: a DreamBooth-style fine-tune on a handful of images, where training too long
turns the model into a copier of those images. On scikit-learn's digits, offline, on CPU:

* pretrain the demo's model (a DDPM around a residual MLP, :mod:`lightning_memwatch.apps.models`) on every
  digit but one (the nine other classes, about 1,600 images, minibatches of 256), or load that checkpoint
  from ``<out>/pretrained_nine_digits.pt`` when a previous run saved it;
* fine-tune it on ``n = 16`` images of the tenth digit (full batch), with :class:`~lightning_memwatch.MemWatch`,
  :class:`~lightning_memwatch.TimescaleDetector` and :class:`~lightning_memwatch.MemorizationEarlyStopping` at
  their defaults: only what has no default is given, the FID's feature extractor (the demo's digit classifier,
  trained on the pretraining digits and the held-out images of the tenth) and its reference set, the held-out
  images of the tenth digit (never fine-tuned on): the quality that matters is "a new 9", not "a digit";
* print what the defaults did: tau_gen, tau_mem, the step whose weights fit ended with, and f_mem and FID at
  the start and at that step. TensorBoard logs go to ``<out>/logs/finetune``.

What it shows is explained in docs/finetune.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FinetuneConfig", "digit_split", "finetune_datamodule", "pretrain", "run_finetune"]

PRETRAINED_FILENAME = "pretrained_nine_digits.pt"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``memwatch demo --finetune``.

    Attributes:
        out: output directory (the pretrained checkpoint, logs/finetune, finetune.json).
        digit: the class fine-tuned on (0-9); the other nine are pretrained on.
        n: images of ``digit`` fine-tuned on.
        pretrain_steps: optimizer steps of the pretraining (minibatches of ``pretrain_batch`` images).
        pretrain_batch: images per pretraining step.
        max_steps: optimizer steps of the fine-tune if tau_mem never stops it.
        lr: Adam learning rate of the pretraining.
        finetune_lr: Adam learning rate of the fine-tune (lower, as fine-tunes are run: at the pretraining's
            rate the full-batch steps on a few images diverge within a few hundred steps).
        seed: seed of the split, the weights and the sampling noise.
        threads: torch threads.
    """

    out: Path = Path("runs/demo-finetune")
    digit: int = 9
    n: int = 16
    pretrain_steps: int = 1500
    pretrain_batch: int = 256
    max_steps: int = 6000
    lr: float = 1e-3
    finetune_lr: float = 2e-4
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if not 0 <= int(self.digit) <= 9:
            raise ValueError(f"digit must be a class of the digits, 0 to 9; got {self.digit}.")
        if int(self.n) < 2:
            raise ValueError(f"n must be >= 2 (images fine-tuned on); got {self.n}.")


def digit_split(digit: int, n: int, seed: int = 0) -> dict[str, Tensor]:
    """scikit-learn's digits in [-1, 1] split for the fine-tune: ``pretrain`` (every other class),
    ``finetune`` (``n`` images of ``digit``, a seeded pick), ``reference`` (the other images of ``digit``),
    and ``pretrain_labels`` / ``reference_labels`` (classes, for the classifier)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0
    labels = torch.tensor(data.target, dtype=torch.long)
    mine = (labels == digit).nonzero().flatten()
    mine = mine[torch.randperm(len(mine), generator=torch.Generator().manual_seed(seed))]
    if n >= len(mine) - 10:
        raise ValueError(f"n = {n} leaves fewer than 10 of the {len(mine)} images of digit {digit} as reference.")
    others = (labels != digit).nonzero().flatten()
    return {
        "pretrain": images[others],
        "pretrain_labels": labels[others],
        "finetune": images[mine[:n]],
        "reference": images[mine[n:]],
        "reference_labels": labels[mine[n:]],
    }


def finetune_datamodule(digit: int = 9, n: int = 16, seed: int = 0, passes_per_epoch: int = 50) -> Any:
    """The fine-tune's data as a Lightning datamodule: ``n`` images of ``digit`` in [-1, 1], full batch
    (``passes_per_epoch`` optimizer steps per epoch); ``reference_images()`` (the other images of that digit)
    is the FID reference MemWatch picks up, ``data_range`` its range."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    split = digit_split(digit, n, seed)

    class FinetuneDigits(L.LightningDataModule):
        data_range = (-1.0, 1.0)

        def train_images(self) -> Tensor:
            return split["finetune"]

        def reference_images(self) -> Tensor:
            return split["reference"]

        def train_dataloader(self) -> DataLoader:
            images = split["finetune"].repeat(passes_per_epoch, 1, 1, 1)  # one batch = one full pass
            return DataLoader(TensorDataset(images, torch.zeros(len(images))), batch_size=n)

    return FinetuneDigits()


def _model(config: FinetuneConfig) -> Any:
    from lightning_memwatch.apps.models import DDPM, ResidualMLP

    torch.manual_seed(config.seed)
    return DDPM(ResidualMLP(dim=64, width=256, num_blocks=3), optimizer="adam", lr=config.lr, sample_steps=100)


def pretrain(
    config: FinetuneConfig,
    images: Tensor,
    echo: Callable[[str], None] = print,
    model: Any = None,
    filename: str = PRETRAINED_FILENAME,
) -> Any:
    """The model pretrained on ``images`` (the nine digits), loaded from ``<out>/<filename>`` when that file
    holds the same settings, else trained and saved there. ``model``: the module to pretrain (default the
    demo's DDPM around a residual MLP). Either way it returns with the global random state seeded from
    ``config.seed``, so the fine-tune after it is the same whether the model was trained or loaded."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    model = _model(config) if model is None else model
    path = config.out / filename
    settings = {"digit": config.digit, "steps": config.pretrain_steps, "batch": config.pretrain_batch,
                "lr": config.lr, "seed": config.seed, "model": type(model).__name__}  # fmt: skip
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("settings") == settings:
            model.load_state_dict(saved["state_dict"])
            echo(f"  pretrained model loaded from {path}")
            L.seed_everything(config.seed, verbose=False)
            return model
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(TensorDataset(images), batch_size=config.pretrain_batch, shuffle=True, generator=generator)
    trainer = L.Trainer(
        max_steps=config.pretrain_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, loader)
    config.out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "settings": settings}, path)
    echo(f"  pretrained on {len(images)} images of nine digits for {config.pretrain_steps} steps in "
         f"{time.perf_counter() - start:.0f} s; saved to {path}")  # fmt: skip
    L.seed_everything(config.seed, verbose=False)  # training drew from the global state; loading did not
    return model


def run_finetune(config: FinetuneConfig | None = None, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Pretrain (or load), fine-tune with MemWatch's defaults, print and return what happened."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_memwatch import FID, MemorizationEarlyStopping, MemWatch
    from lightning_memwatch.apps.demo import train_digit_classifier

    config = config or FinetuneConfig()
    torch.set_num_threads(config.threads)
    for message in (".*does not have many workers.*", ".*module\\(s\\) in eval mode.*", ".*LeafSpec.*"):
        warnings.filterwarnings("ignore", message=message)
    split = digit_split(config.digit, config.n, config.seed)
    echo(
        f"memwatch demo --finetune: pretrain on the nine digits other than {config.digit} "
        f"({len(split['pretrain'])} images), fine-tune on {config.n} images of {config.digit}; MemWatch, "
        f"TimescaleDetector and MemorizationEarlyStopping at their defaults; FID in a digit classifier's features "
        f"against the {len(split['reference'])} held-out images of {config.digit}"
    )
    # the Frechet distance's features: a classifier of all ten classes that never saw the fine-tune images
    classifier = train_digit_classifier(
        torch.cat([split["pretrain"], split["reference"]]),
        torch.cat([split["pretrain_labels"], split["reference_labels"]]),
        seed=config.seed,
    )
    model = pretrain(config, split["pretrain"], echo)

    model.lr = config.finetune_lr  # the recipe DDPM reads it in configure_optimizers
    train = split["finetune"]
    watch = MemWatch(train_data=train, fid=FID(feature_extractor=classifier, reference=split["reference"], cache=False))
    stopper = MemorizationEarlyStopping(watch)
    logger = TensorBoardLogger(save_dir=str(config.out / "logs"), name="", version="finetune", default_hp_metric=False)
    trainer = L.Trainer(
        max_steps=config.max_steps, accelerator="cpu", devices=1, logger=logger, callbacks=[watch, stopper],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=50,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=finetune_datamodule(config.digit, config.n, config.seed))  # full batch
    first = watch.history[0] if watch.history else None
    kept_step = stopper.restored_step if stopper.restored_step is not None else trainer.global_step
    kept = next((r for r in watch.history if r.step == kept_step), None)
    result = {
        "digit": config.digit,
        "n": config.n,
        "steps": trainer.global_step,
        "tau_gen": watch.tau_gen,
        "tau_mem": watch.tau_mem,
        "restored_step": stopper.restored_step,
        "first": None if first is None else {"step": first.step, "f_mem": first.f_mem, "fid": first.fid},
        "kept": None if kept is None else {"step": kept.step, "f_mem": kept.f_mem, "fid": kept.fid},
        "fid_train_floor": watch.fid_train_floor,
        "history": [r.to_dict() for r in watch.history],
        "seconds": time.perf_counter() - start,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
    }
    (config.out / "finetune.json").write_text(json.dumps(result, indent=1) + "\n")
    start_text = (
        "" if first is None else f" (first evaluation, step {first.step}: f_mem {first.f_mem:.3f}, FID {first.fid:.1f})"
    )
    kept_text = "" if kept is None else f": f_mem {kept.f_mem:.3f}, FID {kept.fid:.1f}"
    echo(f"  fine-tune: tau_gen={watch.tau_gen}, tau_mem={watch.tau_mem}, stopped at step {trainer.global_step}")
    echo(f"  fit ended with the weights of step {kept_step}{kept_text}{start_text}")
    echo(f"  FID of the {config.n} fine-tune images themselves (the floor): {watch.fid_train_floor:.1f}"
         if watch.fid_train_floor is not None else "")  # fmt: skip
    echo(f"  TensorBoard: tensorboard --logdir {config.out / 'logs'} --host 127.0.0.1")
    return result

"""Model zoo: does MemWatch make the right call, at its defaults, on models the library does not own or tune?

Five setups, each a model as its users would write it, trained on scikit-learn's digits at small n (it memorizes
within a few thousand steps) on CPU, each with DEFAULT ``MemWatch``, ``TimescaleDetector`` and
``MemorizationEarlyStopping`` settings (only what has no default is given: the sampler, the FID's feature
extractor and reference):

* ``diffusers-ddim``: a diffusers ``UNet2DModel`` trained with ``DDPMScheduler``, sampled with ``DDIMScheduler``
  (20 steps) through :class:`~lightning_memwatch.adapters.DiffusersSampler`;
* ``lucidrains-ddim``: lucidrains' ``Unet`` + ``GaussianDiffusion`` (its [0, 1] convention, its DDIM with 20
  steps) through :class:`~lightning_memwatch.adapters.LucidrainsSampler`;
* ``diffusers-ema``: ``diffusers-ddim`` under Lightning's ``EMAWeightAveraging`` (its default decay);
* ``diffusers-ema-warmup``: ``diffusers-ddim`` under ``EMAWeightAveraging(decay=0.99,
  update_starting_at_step=600)``: the average holds the initial weights until step 601, so MemWatch scores the
  raw weights at steps 100 to 600 and says so (``record.scored_weights == "raw_warmup"``);
* ``finetune``: a diffusers ``UNet2DModel`` pretrained on the nine digits other than 9 (minibatches of 256;
  cached under ``--root``), then fine-tuned on 16 images of 9 (full batch, lr 2e-4); the FID reference is
  the held-out 9s (:mod:`lightning_memwatch.apps.finetune`);
* ``paper-unet-16``: the paper's U-Net recipe (``lightning_memwatch.apps.models``, width 8) on 16x16 digits;
* ``mlp``: a plain MLP denoiser wrapped in the recipe's DDPM module;
* ``diffusers-class``: class-conditional: the diffusers ``UNet2DModel`` with class embeddings
  (``num_class_embeds=10``), trained with the digits' classes as ``class_labels``;
* ``lucidrains-cfg``: class-conditional: lucidrains' classifier-free-guidance ``Unet(num_classes=10)`` +
  ``GaussianDiffusion`` (``denoising_diffusion_pytorch.classifier_free_guidance``), sampled with its default
  guidance scale (6) through ``LucidrainsSampler``.

The conditional setups train on ``(image, class)`` batches; MemWatch draws each sample's class from the training
classes' frequencies (its default), and their rows add the per-class onsets (``class_tau_mem``), the classes
flagged first, the most-copied training images and whether the restored weights come from before every flagged
onset (``before_every_class_onset``).

Quality is a Frechet distance in the feature space of a small digit classifier trained, before any setup, on the
held-out digits (never trained on by the diffusion models): ``FID(feature_extractor=<that nn.Module>)``. It needs
no download, and like Inception-FID it compares the class-level content and diversity of the samples with real
held-out images (Inception itself means nothing at 8x8).

MemWatch runs at its defaults, schedule included (``EvalSchedule.auto()``: every 100 optimizer steps up to
1,000, every 250 up to 2,000, every 500 after; 1000 samples). Not defaults, and why: each model's own sampler
takes 20 DDIM steps (the paper uses 100; CPU budget), and the training-set size ``n`` per setup was chosen,
under the earlier default of every 500 steps, so that the model copies after an evaluation at step 500 (at
n = 16 the diffusers UNet, and lucidrains' at n = 32 and 64, copied before it) and within the run; the sizes
were kept when the default became denser, so the rows compare with the earlier ones (``--every 500``).

For each setup the table reports tau_gen, tau_mem, the step whose weights ``fit`` ended with, f_mem (with its
95% CI) and quality at that evaluation, then f_mem and quality of the final module re-evaluated by a fresh
MemWatch after ``fit`` (same seeds). Targets: the final weights are from before the onset (f_mem CI lower bound
0); the re-evaluation reproduces the restored evaluation; tau_gen comes before tau_mem where quality plateaus
before copying begins (judged with hindsight by :func:`hindsight_plateau`). Each row's JSON holds every
evaluation (step, f_mem and its CI, FD, where each rule stood), the training images' FD, CPU seconds (user +
sys: independent of the machine's load) and the load average.

Run: ``python benchmarks/zoo.py`` (all setups in turn, 2 torch threads), ``--setups mlp lucidrains-ddim``,
``--json out.json``, ``--table-from benchmarks/results/zoo_*.json``, ``--every 500`` (the earlier default),
``--probe 50`` (a ``LossGapProbe`` reading every 50 steps, its readings in the row's ``probe_readings``).
Measured two setups at a time with one thread each on the project's 2-core AMD EPYC: 20-283 s of wall time,
559 s for lucidrains-cfg and 701 s for paper-unet-16 (see docs/integrations.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_memwatch import FID, EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
from lightning_memwatch.apps.data import DigitsDataModule

NUM_HELDOUT = 512
SAMPLER_STEPS = 20  # each model's own evaluation sampler: DDIM with 20 steps (CPU budget; the paper uses 100)


# ------------------------------------------------------------------------------------------------ models
def _images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class DiffusersUNet(L.LightningModule):
    """A diffusers ``UNet2DModel`` trained the way diffusers' unconditional example trains it (epsilon MSE)."""

    def __init__(self, image_size: int = 8, lr: float = 2e-3) -> None:
        super().__init__()
        from diffusers import DDPMScheduler, UNet2DModel

        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=1,
            out_channels=1,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
        )
        self.noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = _images(batch)
        noise = torch.randn_like(x)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x),), device=x.device)
        pred = self.unet(self.noise_scheduler.add_noise(x, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        self.log("train/loss", loss, prog_bar=False, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.unet.parameters(), lr=self.lr)


class Lucidrains(L.LightningModule):
    """lucidrains' ``GaussianDiffusion`` around its ``Unet``; it takes images in [0, 1] (its ``auto_normalize``)."""

    def __init__(self, image_size: int = 8, lr: float = 2e-3) -> None:
        super().__init__()
        from denoising_diffusion_pytorch import GaussianDiffusion, Unet

        net = Unet(dim=16, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=16)
        self.diffusion = GaussianDiffusion(net, image_size=image_size, timesteps=1000, sampling_timesteps=SAMPLER_STEPS)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = (_images(batch) + 1.0) / 2.0  # the datamodule's [-1, 1] to the package's [0, 1]
        loss = self.diffusion(x)
        self.log("train/loss", loss, prog_bar=False, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.diffusion.parameters(), lr=self.lr)


class MLPDenoiser(nn.Module):
    """``eps_hat(x_t, t)``: flattened pixels and a sinusoidal time embedding through a 3-layer SiLU MLP."""

    def __init__(self, shape: tuple[int, int, int] = (1, 8, 8), width: int = 256, time_dim: int = 32) -> None:
        super().__init__()
        self.shape = shape
        dim = math.prod(shape)
        self.time_dim = time_dim
        self.net = nn.Sequential(
            nn.Linear(dim + time_dim, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        half = self.time_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x.device) / half)
        angles = t.float()[:, None] * freqs[None]
        emb = torch.cat([angles.sin(), angles.cos()], dim=1)
        return self.net(torch.cat([x.flatten(1), emb], dim=1)).reshape(x.shape)


class DiffusersClassUNet(DiffusersUNet):
    """The diffusers ``UNet2DModel`` with class embeddings, trained as diffusers' examples train one."""

    def __init__(self, image_size: int = 8, lr: float = 2e-3, num_classes: int = 10) -> None:
        super().__init__(image_size, lr)
        from diffusers import UNet2DModel

        self.unet = UNet2DModel(**{**self.unet.config, "num_class_embeds": num_classes})

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = batch
        noise = torch.randn_like(x)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(x),), device=x.device)
        pred = self.unet(self.noise_scheduler.add_noise(x, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        self.log("train/loss", loss, prog_bar=False, batch_size=len(x))
        return loss


class LucidrainsCFG(L.LightningModule):
    """lucidrains' classifier-free-guidance ``GaussianDiffusion`` around its ``Unet(num_classes=...)``."""

    def __init__(self, image_size: int = 8, lr: float = 2e-3, num_classes: int = 10) -> None:
        super().__init__()
        from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion, Unet

        net = Unet(dim=16, num_classes=num_classes, dim_mults=(1, 2), channels=1, attn_heads=2, attn_dim_head=16)
        self.diffusion = GaussianDiffusion(net, image_size=image_size, timesteps=1000, sampling_timesteps=SAMPLER_STEPS)
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = batch
        loss = self.diffusion((x + 1.0) / 2.0, classes=labels)  # the package's [0, 1]
        self.log("train/loss", loss, prog_bar=False, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.diffusion.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------------------ setups
@dataclass
class Setup:
    """One zoo entry: how to build its module, sampler, datamodule and extra callbacks."""

    name: str
    build: Callable[[], tuple[L.LightningModule, Any]]  # (module, sample_fn or None for module.sample)
    image_size: int = 8
    normalization: str = "minus_one_one"
    ema: bool = False
    ema_kwargs: dict[str, Any] = field(default_factory=dict)  # EMAWeightAveraging(**ema_kwargs) when ema
    n: int = 16  # training images: small enough to copy within the run, large enough not to copy by step 500
    max_steps: int = 3000  # optimizer steps if tau_mem never stops fit
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    # the data: None for the digits split of every other setup, else fn(n, seed) -> a datamodule with
    # train_images(), data_range and reference_images() (the FID reference)
    datamodule: Callable[[int, int], Any] | None = None
    conditional: bool = False  # (image, class) batches; MemWatch reads the classes


def _diffusers() -> tuple[L.LightningModule, Any]:
    from diffusers import DDIMScheduler

    from lightning_memwatch.adapters import DiffusersSampler

    module = DiffusersUNet()
    return module, DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), num_inference_steps=SAMPLER_STEPS)


def _lucidrains() -> tuple[L.LightningModule, Any]:
    from lightning_memwatch.adapters import LucidrainsSampler

    return Lucidrains(), LucidrainsSampler("diffusion", data_range=(-1.0, 1.0))


def _diffusers_class() -> tuple[L.LightningModule, Any]:
    from diffusers import DDIMScheduler

    from lightning_memwatch.adapters import DiffusersSampler

    sample_fn = DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), num_inference_steps=SAMPLER_STEPS)
    return DiffusersClassUNet(), sample_fn


def _lucidrains_cfg() -> tuple[L.LightningModule, Any]:
    from lightning_memwatch.adapters import LucidrainsSampler

    return LucidrainsCFG(), LucidrainsSampler("diffusion", data_range=(-1.0, 1.0))


def _finetune() -> tuple[L.LightningModule, Any]:
    """The diffusers UNet of ``diffusers-ddim``, pretrained on the nine digits other than 9 (cached)."""
    from pathlib import Path

    from diffusers import DDIMScheduler

    from lightning_memwatch.adapters import DiffusersSampler
    from lightning_memwatch.apps.finetune import FinetuneConfig, digit_split, pretrain

    config = FinetuneConfig(out=Path(os.environ.get("MEMWATCH_ZOO_ROOT", "/tmp/memwatch_zoo")), digit=9, n=16,
                            pretrain_steps=1500, threads=torch.get_num_threads())  # fmt: skip
    torch.manual_seed(0)
    module = pretrain(config, digit_split(9, 16)["pretrain"], model=DiffusersUNet(),
                      filename="pretrained_diffusers_nine_digits.pt")  # fmt: skip
    module.lr = 2e-4  # a fine-tune's lower rate (the pretraining ran at 2e-3)
    return module, DiffusersSampler(DDIMScheduler(num_train_timesteps=1000), num_inference_steps=SAMPLER_STEPS)


def _finetune_data(n: int, seed: int) -> Any:
    from lightning_memwatch.apps.finetune import finetune_datamodule

    return finetune_datamodule(digit=9, n=n, seed=seed)


def _paper_unet() -> tuple[L.LightningModule, Any]:
    from lightning_memwatch.apps.models import DDPM, UNet

    return DDPM(UNet(base_width=8), optimizer="adam", lr=2e-3, sample_steps=SAMPLER_STEPS), None


def _mlp() -> tuple[L.LightningModule, Any]:
    from lightning_memwatch.apps.models import DDPM

    return DDPM(MLPDenoiser(), optimizer="adam", lr=2e-3, sample_steps=SAMPLER_STEPS), None


SETUPS = {
    s.name: s
    for s in [
        # at n = 16 (32 for lucidrains) these copied by step 500, the first evaluation of the earlier default
        Setup("diffusers-ddim", _diffusers, n=40),
        Setup("lucidrains-ddim", _lucidrains, n=128),  # at n = 64 it still copied by step 500
        Setup("diffusers-ema", _diffusers, ema=True),  # the average lags the raw weights: copies later
        # a warm-up past MemWatch's first evaluations (steps 100-600): the raw weights are scored there, and said so
        Setup("diffusers-ema-warmup", _diffusers, ema=True, ema_kwargs={"decay": 0.99, "update_starting_at_step": 600}),
        Setup("finetune", _finetune, n=16, max_steps=6000, datamodule=_finetune_data),
        Setup("paper-unet-16", _paper_unet, image_size=16, normalization="center", max_steps=4000),
        # at n = 8 it plateaued only 0.78 doublings before copying began (step 6000): too short to confirm
        Setup("mlp", _mlp, n=16, max_steps=16000),
        Setup("diffusers-class", _diffusers_class, n=128, conditional=True),  # at n = 40 it copied by step 500
        Setup("lucidrains-cfg", _lucidrains_cfg, n=128, conditional=True),
    ]
}


# ------------------------------------------------------------------------------------------------ quality
def train_classifier(epochs: int = 300) -> nn.Module:
    """The demo's digit classifier, trained on the held-out digits (the split every setup shares)."""
    from lightning_memwatch.apps.demo import train_digit_classifier

    dm = DigitsDataModule(n=64, num_heldout=NUM_HELDOUT)
    dm.setup("fit")
    return train_digit_classifier(dm.heldout_images(), dm.heldout_labels(), epochs=epochs)


# ------------------------------------------------------------------------------------------------ one run
def _trainer(max_steps: int, callbacks: list, root: str) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=root,
    )


def run_setup(
    setup: Setup,
    classifier: nn.Module,
    *,
    n: int,
    max_steps: int,
    seed: int,
    root: str,
    every: int | None = None,
    probe_every: int | None = None,
) -> dict:
    """Train one setup with default MemWatch + MemorizationEarlyStopping, then re-evaluate the final module;
    ``every``: evaluate every that many steps instead of MemWatch's default schedule; ``probe_every``: add a
    default ``LossGapProbe`` reading every that many steps (its readings go into the row)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    L.seed_everything(seed, verbose=False)
    os.environ["MEMWATCH_ZOO_ROOT"] = root  # where a setup caches what it pretrains
    if setup.datamodule is not None:
        dm = setup.datamodule(n, seed)
    else:
        dm = DigitsDataModule(
            n=n,
            num_heldout=NUM_HELDOUT,
            image_size=setup.image_size,
            normalization=setup.normalization,
            full_batch=True,
            passes_per_epoch=50,  # fewer Lightning epoch boundaries; one batch is still one optimizer step
            labelled=setup.conditional,
        )
    dm.setup("fit")
    low, high = dm.data_range
    # the classifier takes 8x8 images in [-1, 1]: map (low, high) = (-1, 1) or (-mean, 1 - mean) to it
    feat = nn.Sequential(_Affine(-low, 2.0 / (high - low), -1.0), _Classifier8(classifier)).eval()

    module, sample_fn = setup.build()

    def watch() -> MemWatch:
        return MemWatch(
            train_data=dm.train_images(),  # the datamodule's repeating sampler hides its rows from MemWatch
            sample_fn=sample_fn,
            data_range=None,
            fid=FID(feature_extractor=feat, cache=False),
            verbose=False,
            log_images=False,
            train_labels=dm.train_labels() if setup.conditional else None,
        )

    live = watch()
    if every is not None:
        live.schedule = EvalSchedule.every(every)
    curve: list[dict[str, Any]] = []

    def record(trainer: L.Trainer, module: L.LightningModule, r: dict) -> None:
        point = {k: r[k] for k in ("step", "f_mem", "f_mem_ci_low", "f_mem_ci_high", "fid")}
        # what the onset forecast reads and says (lightning_memwatch.onset), and which weights were scored
        for key in ("num_samples", "ratio_q05", "ratio_q25", "ratio_median", "onset_forecast",
                    "onset_forecast_low", "onset_forecast_high", "scored_weights"):  # fmt: skip
            point[key] = r.get(key)
        point["status"] = live.detector.status  # where each rule stands after this record
        curve.append(point)
        print(
            f"  [{setup.name}] step {r['step']}: f_mem {r['f_mem']:.3f} [{r['f_mem_ci_low']:.3f}, "
            f"{r['f_mem_ci_high']:.3f}], FD {r['fid']:.2f} ({time.perf_counter() - start:.0f} s) {point['status']}",
            flush=True,
        )

    live.add_listener(record)
    stopper = MemorizationEarlyStopping(live)
    callbacks: list = []
    if setup.ema:
        from lightning.pytorch.callbacks import EMAWeightAveraging

        callbacks.append(EMAWeightAveraging(**setup.ema_kwargs))
    callbacks += [live, stopper]
    probe = None
    if probe_every is not None:
        from lightning_memwatch import LossGapProbe

        probe = LossGapProbe(every_n_train_steps=probe_every)  # held-out: the datamodule's reference images
        callbacks.append(probe)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _trainer(max_steps, callbacks, root)
        trainer.fit(module, datamodule=dm)
    fit_seconds = time.perf_counter() - start
    final_step = trainer.global_step

    # a fresh MemWatch (same seeds and defaults) scores the module fit handed back, at its step 0
    again = watch()
    again.schedule = again.schedule.coerce([0])
    _trainer(1, [again], root).fit(module, datamodule=dm)
    final = again.history[0]

    restored = stopper.restored_step
    kept_step = restored if restored is not None else final_step
    kept = next((r for r in live.history if r["step"] == kept_step), None)
    row = {
        "setup": setup.name,
        "n": n,
        "every": every,  # None: MemWatch's default schedule
        "probe_readings": None if probe is None else [r.to_dict() for r in probe.history],
        "steps": final_step,
        "evaluations": len(live.history),
        "tau_gen": live.tau_gen,
        "tau_mem": live.tau_mem,
        "restored_step": restored,
        "kept_f_mem": None if kept is None else kept["f_mem"],
        "kept_ci": None if kept is None else (kept["f_mem_ci_low"], kept["f_mem_ci_high"]),
        "kept_fid": None if kept is None else kept["fid"],
        "final_f_mem": final["f_mem"],
        "final_ci": (final["f_mem_ci_low"], final["f_mem_ci_high"]),
        "final_fid": final["fid"],
        "fid_train_floor": live.fid_train_floor,
        "stop_message": stopper.stopping_reason_message,
        "tau_gen_event": None if live.detector.tau_gen is None else live.detector.tau_gen.to_dict(),
        "history": curve,
        "warnings": sorted({str(w.message)[:160] for w in caught if "MemorizationEarlyStopping" in str(w.message)}),
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu_start,  # user + sys of this process: load-independent
        "fit_seconds": fit_seconds,
        "load_average": os.getloadavg(),  # 1, 5, 15 min at the end of the setup (the machine is shared)
    }
    row["pre_onset"] = row["final_ci"][0] == 0.0
    row["reproduced"] = (
        kept is not None
        and abs(row["final_f_mem"] - row["kept_f_mem"]) <= 1.0 / kept["num_samples"]
        and abs(row["final_fid"] - row["kept_fid"]) <= 1e-3 * max(1.0, abs(row["kept_fid"]))
    )
    row["gen_before_mem"] = (
        row["tau_gen"] is not None and (row["tau_mem"] is None or row["tau_gen"] < row["tau_mem"])
    )
    if setup.conditional:
        row.update(per_class_row(live, kept_step, dm.train_labels()))
    return row


def per_class_row(watch: MemWatch, kept_step: int, train_labels: Tensor) -> dict:
    """The per-class part of a conditional setup's row: onsets, first classes, most-copied images, and whether the
    weights fit ended with come from before every flagged class onset."""
    onsets = {int(k): e.step for k, e in sorted(watch.detector.class_tau_mem.items())}
    first = min(onsets.values()) if onsets else None
    return {
        "class_tau_mem": onsets,
        "classes_flagged_first": [k for k, s in onsets.items() if s == first],
        "class_sizes": {int(k): int(v) for k, v in zip(*torch.unique(train_labels, return_counts=True), strict=True)},
        "per_class_history": [
            {"step": r.step, **{str(k): [c.num_samples, c.f_mem, c.f_mem_ci_low] for k, c in r.per_class.items()}}
            for r in watch.history
        ],
        "most_copied": [dataclasses.asdict(r) for r in watch.copied_training_images()[:10]],
        "before_every_class_onset": all(kept_step < s for s in onsets.values()),
    }


class _Affine(nn.Module):
    """``(x + offset) * scale + shift``: the datamodule's scale to the classifier's [-1, 1]."""

    def __init__(self, offset: float, scale: float, shift: float) -> None:
        super().__init__()
        self.offset, self.scale, self.shift = float(offset), float(scale), float(shift)

    def forward(self, x: Tensor) -> Tensor:
        return (x + self.offset) * self.scale + self.shift


class _Classifier8(nn.Module):
    """The classifier's features of images average-pooled to its 8x8 input."""

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != 8:
            x = F.adaptive_avg_pool2d(x, 8)
        return self.classifier(x)


# ------------------------------------------------------------------------------------------------ plateau
PLATEAU_REL_TOL = 0.05  # "flat": within 5% of the distance above the training images' level (the rule's rel_tol)


def hindsight_plateau(row: dict) -> dict:
    """Did quality plateau before copying began? Judged with hindsight from the recorded pre-onset curve.

    The level is the best FD before the onset C (tau_mem; the whole run when it never came). The noise sd is
    the median |difference| of successive pre-onset FDs at steps > C / 2, over 0.6745 sqrt(2) (0 with fewer
    than 3 of them). The plateau began at P, the first evaluation within max(5% of the level's distance
    above the training images' FD, 2 noise sd) of the level. Quality plateaued before copying when it had
    fallen by >= 20% of that distance from the first evaluation and stayed flat for a doubling of training
    time before the onset (C >= 2 P): a shorter pause cannot be told from a pause in a descent on the paper's
    log-time axes, and no causal rule can confirm it before C.
    """
    onset = row["tau_mem"]
    curve = [(p["step"], p["fid"]) for p in row["history"] if onset is None or p["step"] < onset]
    if not curve:
        return {"plateau_step": None, "level": None, "noise_sd": None, "doublings": None, "plateaued": False,
                "why": "no pre-onset evaluation"}
    end = onset if onset is not None else curve[-1][0]
    floor = row["fid_train_floor"] or 0.0
    level = min(q for _, q in curve)
    late = [q for s, q in curve if s > end / 2]
    diffs = sorted(abs(b - a) for a, b in zip(late, late[1:]))
    noise = 0.0
    if len(diffs) >= 2:
        mid = len(diffs) // 2
        median = diffs[mid] if len(diffs) % 2 else 0.5 * (diffs[mid - 1] + diffs[mid])
        noise = median / (0.6745 * math.sqrt(2.0))
    within = max(PLATEAU_REL_TOL * max(level - floor, 0.0), 2.0 * noise)
    start = next(s for s, q in curve if q <= level + within)
    fell = (curve[0][1] - level) >= 0.2 * max(curve[0][1] - floor, 0.0)
    doublings = math.log2(end / start) if start > 0 else math.inf
    if len(curve) < 2:
        why = "one pre-onset evaluation"
    elif not fell:
        why = "fell < 20% before the onset"
    else:
        why = f"at its level from step {start}, {doublings:.2f} doublings before the onset"
    return {
        "plateau_step": start,
        "level": level,
        "noise_sd": noise,
        "doublings": doublings,
        "plateaued": bool(len(curve) >= 2 and fell and doublings >= 1.0),
        "why": why,
    }


def redetect(row: dict) -> dict:
    """tau_gen and tau_mem of the recorded curve under this version's default detector (the rows of older runs
    were flagged live by the version they ran with; the weights restored do not depend on tau_gen)."""
    detector = TimescaleDetector()
    detector.set_reference_floor(row["fid_train_floor"])
    for point in row["history"]:
        detector.update(point)
    gen, mem = detector.tau_gen, detector.tau_mem
    return {
        "tau_gen": None if gen is None else gen.step,
        "tau_gen_confirmed": None if gen is None else gen.confirmed_step,
        "tau_mem": None if mem is None else mem.step,
    }


# ------------------------------------------------------------------------------------------------ table
def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def table(rows: list[dict]) -> str:
    head = (
        "| setup | n | steps | tau_gen (confirmed) | tau_mem | plateau before onset | restored step "
        "| f_mem at restored [95% CI] | FD at restored | final f_mem [95% CI] | final FD | pre-onset | reproduced "
        "| tau_gen < tau_mem | CPU s | wall s (load) |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        now = redetect(r)
        plateau = hindsight_plateau(r)
        gen = "-" if now["tau_gen"] is None else f"{now['tau_gen']} ({now['tau_gen_confirmed']})"
        flat = f"{'yes' if plateau['plateaued'] else 'no'} ({plateau['why']})"
        before = now["tau_gen"] is not None and (now["tau_mem"] is None or now["tau_gen"] < now["tau_mem"])
        kept = "-"
        if r["kept_f_mem"] is not None:
            kept = f"{r['kept_f_mem']:.3f} [{r['kept_ci'][0]:.3f}, {r['kept_ci'][1]:.3f}]"
        lines.append(
            f"| {r['setup']} | {r['n']} | {r['steps']} | {gen} | {_fmt(now['tau_mem'])} | {flat} | "
            f"{_fmt(r['restored_step'])} | {kept} | {_fmt(r['kept_fid'], '.2f')} | "
            f"{r['final_f_mem']:.3f} [{r['final_ci'][0]:.3f}, {r['final_ci'][1]:.3f}] | {r['final_fid']:.2f} | "
            f"{'yes' if r['pre_onset'] else 'NO'} | {'yes' if r['reproduced'] else 'NO'} | "
            f"{'yes' if before else 'no'} | {r['cpu_seconds']:.0f} | {r['seconds']:.0f} ({r['load_average'][0]:.1f}) |"
        )
    return "\n".join(lines)


def class_table(rows: list[dict]) -> str:
    """The per-class lines of the conditional setups: onsets, first classes, most-copied images, restored weights."""
    lines = []
    for r in rows:
        if "class_tau_mem" not in r:
            continue
        onsets = ", ".join(f"{k}: {s}" for k, s in r["class_tau_mem"].items()) or "none"
        top = r["most_copied"][:5]
        copied = ", ".join(f"#{c['train_index']} (class {c['label']}) x{c['times_copied']}" for c in top)
        lines.append(
            f"{r['setup']} (n={r['n']}, classes {r['class_sizes']}): per-class tau_mem {{{onsets}}}; flagged first: "
            f"{r['classes_flagged_first'] or '-'}; most copied: {copied or '-'}; restored step "
            f"{_fmt(r['restored_step'])} before every class onset: {'yes' if r['before_every_class_onset'] else 'NO'}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--n", type=int, default=None, help="training images (digits); default per setup")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps if tau_mem never stops fit "
                        "(default per setup)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the budget: 2 cores per setup)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=None, help="evaluate every N steps (default: MemWatch's)")
    parser.add_argument("--probe", type=int, default=None, help="add a LossGapProbe reading every N steps")
    parser.add_argument("--json", default=None, help="write the rows (and each evaluation) to this file")
    parser.add_argument("--root", default="/tmp/memwatch_zoo", help="Lightning's default_root_dir")
    parser.add_argument("--table-from", nargs="+", default=None, help="print the table of earlier --json files")
    args = parser.parse_args(argv)
    if args.table_from:
        rows = [row for path in args.table_from for row in json.load(open(path))]
        print(table(rows))
        print(class_table(rows))
        return 0
    torch.set_num_threads(args.threads)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    classifier = train_classifier()
    rows = []
    for name in args.setups:
        n = args.n or SETUPS[name].n
        max_steps = args.max_steps or SETUPS[name].max_steps
        row = run_setup(
            SETUPS[name], classifier, n=n, max_steps=max_steps, seed=args.seed, root=args.root, every=args.every,
            probe_every=args.probe,
        )
        rows.append(row)
        print(f"{name}: {row['seconds']:.0f} s wall, {row['cpu_seconds']:.0f} s CPU, load {row['load_average']}, "
              f"FD(train, reference) {row['fid_train_floor']}", flush=True)
        for w in row["warnings"]:
            print(f"  warning: {w}", flush=True)
    print(table(rows))
    print(class_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

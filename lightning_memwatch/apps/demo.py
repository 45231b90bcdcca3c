"""``memwatch demo``: watch a diffusion model generalize, then memorize, on 2 CPU cores in minutes, offline.

The demo goes through the public API exactly as a user's training code would:

* data: scikit-learn's handwritten digits (1,797 real 8x8 images shipped with scikit-learn), rescaled
  to [-1, 1], split once by :class:`~lightning_memwatch.apps.data.DigitsDataModule`: the last ``num_heldout``
  images of a seeded permutation are held out, and the training sets of the different ``n`` are nested
  prefixes of the rest;
* model: the recipe :class:`~lightning_memwatch.apps.models.DDPM` (T = 1000, linear betas, epsilon MSE, Adam)
  around a :class:`~lightning_memwatch.apps.models.ResidualMLP` denoiser (3 blocks of width 256 with a time
  encoding, 429k parameters), trained full batch (batch = n, the paper's min(512, n)) on n = 64, 128, 256
  and 512 digits; samples by deterministic DDIM (eta = 0) from 512 fixed noises, with EMA weights whose
  decay is warmed up (:func:`ema_warmup_decay`; ``--ema 0`` samples the raw weights, as the paper does);
* :class:`~lightning_memwatch.MemWatch` measures f_mem (nearest-neighbour ratio d1/d2 < 1/3 in pixel space)
  and a Frechet distance in the feature space of a small digit classifier trained here on the *held-out*
  digits (Inception means nothing at 8x8), passed as ``FID(feature_extractor=<that classifier>)``;
* a :class:`~lightning_memwatch.TimescaleDetector` with demo settings (printed): tau_gen when the Frechet
  distance falls to ``gen_threshold`` (50; on this scale the real training sets score 4 to 21 and clipped
  Gaussian noise about 820), tau_mem when f_mem exceeds ``mem_threshold`` (3% of the samples);
* :class:`~lightning_memwatch.MemorizationEarlyStopping` stops each run when tau_mem is flagged (the detector's
  ``patience``: 3 evaluations in a row above the threshold) and restores the best weights before the onset;
* the runs (one per ``n``) go to worker processes with one thread each (two side by side use 2 cores best);
* finally :func:`lightning_memwatch.apps.report.report` reads the TensorBoard logs back, recomputes the timescales
  offline, fits tau_mem = slope * n, prints the table and writes ``summary.json`` and the plots.

Outputs, under ``--out`` (default ``runs/demo``; ``runs/demo-quick`` with ``--quick``; a folder that holds
anything is refused unless ``--overwrite`` is given, which replaces the demo's outputs there)::

    summary.json            runs (n, tau_gen, tau_mem, final f_mem, best Frechet distance) and the fit
    plots/*.png             f_mem vs step and vs step / n, Frechet distance vs step, timescales vs n, forecast
    logs/n<n>/              one TensorBoard run per n (events file, memwatch_run.json); n zero-padded to the
                            largest n's digits (n08, n16, n32), so TensorBoard lists the runs in the order of n
    digit_classifier.pt     the feature network of the Frechet distance

Open the logs with ``tensorboard --logdir runs/demo/logs --host 127.0.0.1`` (the command is printed with the path
of the ``tensorboard`` beside the running Python when that one is not on ``PATH``, as after ``make demo``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "DemoConfig",
    "DigitFeatureNet",
    "OutputFolderNotEmptyError",
    "classifier_frechet_distance",
    "main",
    "run_demo",
    "train_digit_classifier",
]

NUM_DIGITS = 1797
CLASSIFIER_FILENAME = "digit_classifier.pt"
QUICK_OUT = Path("runs/demo-quick")
"""Default output folder of ``memwatch demo --quick`` (the full demo's is ``runs/demo``)."""
_OUTPUTS = ("logs", "plots", "summary.json", CLASSIFIER_FILENAME)  # what the demo writes under --out
QUALITY_LABEL = "Frechet distance (digit-classifier features)"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo (defaults: the full demo; :meth:`quick` gives the quick demo).

    Attributes:
        out: output directory (summary.json, plots/, logs/).
        ns: training-set sizes (images), one run each; at most ``1797 - num_heldout`` (nested prefixes).
        num_heldout: digits never trained on: the classifier's training data and the Frechet reference.
        width: hidden width of the residual MLP denoiser.
        num_blocks: residual blocks of the denoiser.
        lr: Adam learning rate (constant).
        ema_decay: decay of the EMA weights that sampling uses, or None for the raw weights (the paper). The
            decay is warmed up, ``min(ema_decay, (1 + t) / (10 + t))`` at step t (:func:`ema_warmup_decay`),
            so the average forgets the initial weights early. Without the warm-up the average lags the raw
            weights by about ``1 / (1 - ema_decay)`` = 1000 steps from the start, which delays tau_gen past
            tau_mem at n = 64. Raw weights give the same timescales here, with noisier f_mem curves.
        num_samples: generated samples per evaluation (images), for f_mem and the Frechet distance.
        sample_steps: DDIM timesteps (``S - 1`` denoiser evaluations per sample).
        eval_every: evaluate every ``max(eval_every, eval_every_per_image * n)`` optimizer steps, so that
            every run is evaluated on about the same grid of step / n.
        eval_every_per_image: see ``eval_every``.
        max_steps_per_image: cap of a run, ``max_steps_per_image * n + max_steps_extra`` optimizer steps, in
            case tau_mem never fires.
        max_steps_extra: see ``max_steps_per_image``.
        gen_threshold: tau_gen is the first evaluation whose Frechet distance is <= this value. The scale
            is the classifier's: the real training sets score 4 (n = 512) to 21 (n = 128), noise about 820,
            and the models' plateaus lie between 10 (n = 512) and 35 (n = 64).
        mem_threshold: tau_mem is the first evaluation whose f_mem is > this value (the fraction of memorized
            samples; the detector's ``mem_rule="threshold"`` with ``f0=mem_threshold``).
        mem_patience: evaluations in a row above ``mem_threshold`` needed to flag tau_mem (the detector's
            ``patience``; tau_mem is dated at the first of them). Training stops at the evaluation that flags
            it, so the last few evaluations show memorization growing.
        workers: worker processes (runs side by side); 1 runs everything in this process.
        threads_per_worker: torch threads of each worker.
        seed: seed of the data split, the weights and the sampling noise.
        classifier_epochs: full-batch epochs of the digit classifier.
        bootstrap: bootstrap resamples of the f_mem confidence interval.
        log_images: log sample grids and nearest-neighbour pairs to TensorBoard at each evaluation.
        plots: write the report's PNG plots.
        draws_per_step: noisy images per optimizer step (0: the plain full batch of n). Each training image
            enters the loss :meth:`noise_draws` = ``max(1, draws_per_step // n)`` times, each copy with its
            own t and noise. More draws cut the gradient noise, so that the quick demo's models memorize
            within a few hundred steps; the data itself is unchanged.
        passes_per_epoch: data passes (optimizer steps, full batch) per Lightning epoch; more save Lightning's
            per-epoch overhead, which dominates a step at tiny n.
        conditional: train class-conditional models (the denoiser's class embedding, the digits' classes as
            labels): MemWatch then reports f_mem and tau_mem per class and the copied training digits.
    """

    out: Path = Path("runs/demo")
    ns: tuple[int, ...] = (64, 128, 256, 512)
    num_heldout: int = 1285
    width: int = 256
    num_blocks: int = 3
    lr: float = 1e-3
    ema_decay: float | None = 0.999
    num_samples: int = 512
    sample_steps: int = 100
    eval_every: int = 100
    eval_every_per_image: float = 0.5
    max_steps_per_image: int = 30
    max_steps_extra: int = 3000
    gen_threshold: float = 50.0
    mem_threshold: float = 0.03
    mem_patience: int = 3
    workers: int = 2
    threads_per_worker: int = 1
    seed: int = 0
    classifier_epochs: int = 300
    bootstrap: int = 1000
    log_images: bool = True
    plots: bool = True
    draws_per_step: int = 0
    passes_per_epoch: int = 1
    conditional: bool = False

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """Quick-demo settings (about a minute on 2 cores): memorization flagged within a few hundred steps.

        n = 8, 16, 32; every step trains on 256 noisy copies of the full batch (``draws_per_step``), so the
        default denoiser memorizes fast at lr 3e-3; 256 samples by DDIM-20 every 25 steps; the detector and
        early-stopping rules of the full demo. tau_mem comes in the order of n; tau_gen (Frechet distance <=
        50) does not fire: these tiny models copy their training digits before they generate well.
        """
        settings: dict[str, Any] = dict(
            ns=(8, 16, 32),
            lr=3e-3,
            ema_decay=0.99,
            num_samples=256,
            sample_steps=20,
            eval_every=25,
            eval_every_per_image=0.0,
            max_steps_per_image=20,
            max_steps_extra=300,
            draws_per_step=256,
            passes_per_epoch=50,
            classifier_epochs=100,
            bootstrap=100,
            log_images=True,
        )
        settings.update(overrides)
        return cls(**settings)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        ns = tuple(int(n) for n in self.ns)
        if not ns or min(ns) < 2 or len(set(ns)) != len(ns):
            raise ValueError(f"ns must be distinct training-set sizes >= 2 (images); got {self.ns}.")
        pool = NUM_DIGITS - self.num_heldout
        if not 1 <= self.num_heldout < NUM_DIGITS or max(ns) > pool:
            raise ValueError(
                f"The largest n ({max(ns)}) must fit the {pool} non-held-out digits (1797 - num_heldout="
                f"{self.num_heldout}): lower n or num_heldout."
            )
        object.__setattr__(self, "ns", ns)
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1) or be None; got {self.ema_decay}.")
        if self.workers < 1 or self.threads_per_worker < 1:
            raise ValueError(
                f"workers and threads_per_worker must be >= 1; got {self.workers}, {self.threads_per_worker}."
            )
        if not 0.0 <= self.mem_threshold < 1.0:
            raise ValueError(f"mem_threshold must lie in [0, 1) (a fraction); got {self.mem_threshold}.")
        if self.num_samples < 2 or self.sample_steps < 2 or self.eval_every < 1:
            raise ValueError("num_samples, sample_steps must be >= 2 and eval_every >= 1.")
        if self.draws_per_step < 0 or self.passes_per_epoch < 1:
            raise ValueError(
                f"draws_per_step must be >= 0 (0: the plain full batch) and passes_per_epoch >= 1; "
                f"got {self.draws_per_step}, {self.passes_per_epoch}."
            )

    def eval_period(self, n: int) -> int:
        """Optimizer steps between two evaluations of the run with ``n`` training images."""
        return max(int(self.eval_every), int(math.ceil(self.eval_every_per_image * n)))

    def run_name(self, n: int) -> str:
        """The TensorBoard run (folder under ``logs/``) of the run with ``n`` images: ``n`` zero-padded to the
        largest n's digits (``n08``, ``n16``, ``n32``), so runs sort by n in TensorBoard's lists."""
        return f"n{int(n):0{len(str(max(self.ns)))}d}"

    def noise_draws(self, n: int) -> int:
        """Noisy copies of each training image in the loss of one step of the run with ``n`` images."""
        return max(1, int(self.draws_per_step) // n)

    def max_steps(self, n: int) -> int:
        """Optimizer steps after which the run with ``n`` images stops even without tau_mem."""
        return int(self.max_steps_per_image * n + self.max_steps_extra)

    def detector_kwargs(self) -> dict[str, Any]:
        """The :class:`~lightning_memwatch.TimescaleDetector` settings of the demo."""
        return {
            "quality_key": "fid",
            "gen_rule": "floor",
            "floor": float(self.gen_threshold),
            "eps": 0.0,
            "mem_rule": "threshold",
            "f0": float(self.mem_threshold),
            "patience": int(self.mem_patience),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-able settings."""
        data = dataclasses.asdict(self)
        data["out"] = str(self.out)
        data["ns"] = list(self.ns)
        return data


def ordinal(k: int) -> str:
    """``1st``, ``2nd``, ``3rd``, ``4th``, ..., ``11th``, ``12th``, ``13th``, ``21st``, ..."""
    k = int(k)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


# ------------------------------------------------------------------------------------------------------------
# the feature network of the Frechet distance


class DigitFeatureNet(nn.Module):
    """A small MLP digit classifier; called on images it returns its penultimate features (N, 64).

    ``Flatten -> Linear(64, 128) -> ReLU -> Linear(128, 64) -> ReLU`` gives the features, a final
    ``Linear(64, 10)`` (:meth:`logits`) the classes. Images are 8x8 digits in [-1, 1], any shape with 64
    entries per image.
    """

    num_features = 64

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, self.num_features), nn.ReLU()
        )
        self.head = nn.Linear(self.num_features, 10)

    def forward(self, images: Tensor) -> Tensor:
        """Penultimate features (N, 64) of images (N, 1, 8, 8) (or (N, 64))."""
        return self.body(images)

    def logits(self, images: Tensor) -> Tensor:
        """Class scores (N, 10)."""
        return self.head(self.body(images))


def train_digit_classifier(
    images: Tensor, labels: Tensor, *, epochs: int = 300, lr: float = 3e-3, seed: int = 0
) -> DigitFeatureNet:
    """Train :class:`DigitFeatureNet` full batch with Adam on (images, labels); returns it frozen, in eval mode.

    A little Gaussian pixel noise (std 0.1, in [-1, 1] units) is added to the inputs during training, so that
    the features of imperfect samples stay meaningful.

    Args:
        images: (N, 1, 8, 8) or (N, 64) float images in [-1, 1] (not modified).
        labels: (N,) int64 classes 0..9.
        epochs: full-batch optimizer steps.
        lr: Adam learning rate.
        seed: seed of the initialisation and the input noise.
    """
    if len(images) != len(labels) or len(images) < 10:
        raise ValueError(f"Need matching images and labels (>= 10); got {len(images)} and {len(labels)}.")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DigitFeatureNet()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    x, y = images.detach().float().reshape(len(images), -1), labels.detach().long()
    net.train()
    for _ in range(epochs):
        noisy = x + 0.1 * torch.randn(x.shape, generator=generator)
        loss = nn.functional.cross_entropy(net.logits(noisy), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return net.eval().requires_grad_(False)


def classifier_accuracy(net: DigitFeatureNet, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` whose predicted class equals ``labels``."""
    with torch.inference_mode():
        return float((net.logits(images.float()).argmax(1) == labels).float().mean())


def classifier_frechet_distance(net: nn.Module, generated: Tensor, reference: Tensor) -> float:
    """Frechet distance between two image sets in ``net``'s feature space (float64 statistics)."""
    from lightning_memwatch.metrics.fid import feature_statistics, frechet_distance

    with torch.inference_mode():
        mu1, cov1 = feature_statistics(net(generated.float()))
        mu2, cov2 = feature_statistics(net(reference.float()))
    return float(frechet_distance(mu1, cov1, mu2, cov2))


# ------------------------------------------------------------------------------------------------------------
# EMA weights with a warm-up


def ema_warmup_decay(step: int, decay: float) -> float:
    """EMA decay at optimizer step ``step``: ``min(decay, (1 + step) / (10 + step))``."""
    return min(float(decay), (1.0 + step) / (10.0 + step))


def _ema_warmup_callback(decay: float) -> Any:
    import lightning as L

    class EMAWarmup(L.Callback):
        """Warm up the EMA decay of :class:`~lightning_memwatch.apps.models.DDPM` (built with ``ema_decay``).

        Before each optimizer step it sets ``pl_module.ema_decay = min(decay, (1 + t) / (10 + t))``; the DDPM
        updates its EMA copy with that decay after the step, and its ``sample`` (hence MemWatch) draws from
        the EMA copy. The EMA copy is a submodule, so checkpoints and MemorizationEarlyStopping's
        ``restore_best`` carry it.
        """

        def __init__(self) -> None:
            self.decay = float(decay)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            pl_module.ema_decay = ema_warmup_decay(trainer.global_step, self.decay)

    return EMAWarmup()


def _diffusion_model(config: DemoConfig, n: int) -> Any:
    """The DDPM of the run with ``n`` images; its loss covers ``config.noise_draws(n)`` noisy copies of the batch."""
    from lightning_memwatch.apps.models import DDPM, ResidualMLP

    num_classes = 10 if config.conditional else None  # the digits' classes
    denoiser = ResidualMLP(dim=64, width=config.width, num_blocks=config.num_blocks, num_classes=num_classes)
    settings: dict[str, Any] = dict(
        optimizer="adam", lr=config.lr, sample_steps=config.sample_steps, ema_decay=config.ema_decay
    )
    draws = config.noise_draws(n)
    if draws == 1:
        return DDPM(denoiser, **settings)

    class MultiDrawDDPM(DDPM):
        """DDPM whose epsilon loss at each step covers ``draws`` copies of the batch (own t and noise each)."""

        def diffusion_loss(self, x0: Tensor, labels: Tensor | None = None) -> Tensor:
            repeated = None if labels is None else labels.repeat(draws)
            return super().diffusion_loss(x0.repeat(draws, *([1] * (x0.dim() - 1))), repeated)

    return MultiDrawDDPM(denoiser, **settings)


# ------------------------------------------------------------------------------------------------------------
# one run (in a worker process)


_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


def _quiet_lightning() -> None:
    """Silence Lightning's banners and the warnings that do not apply to the demo (process-wide: workers)."""
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the DDPM's frozen EMA copy
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # the stopper's message when quality was still improving: the demo prints each run's outcome as one line
    warnings.filterwarnings("ignore", message="Memorization detected")
    # a deprecated call of this library stays visible (Python hides DeprecationWarnings outside __main__)
    warnings.filterwarnings("default", category=DeprecationWarning, module=r"lightning_memwatch\.")


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass
    _quiet_lightning()


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.contextmanager
def _quieted() -> Iterator[None]:
    """:func:`_quiet_lightning` for the duration of a block: warning filters and logger levels restored after."""
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    with warnings.catch_warnings():
        _quiet_lightning()
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def demo_objects(config: DemoConfig) -> list[str]:
    """How each run builds its detector and early stopping, as code (the values the runs use)."""
    from lightning_memwatch import TimescaleDetector

    built = TimescaleDetector(**config.detector_kwargs())
    given = {k: v for k, v in built.config().items() if k in config.detector_kwargs()}
    return [
        f"detector = TimescaleDetector({', '.join(f'{k}={v!r}' for k, v in given.items())})",
        "stopper = MemorizationEarlyStopping(watch, restore_best=True)  # stops when the detector flags tau_mem",
    ]


def tau_gen_line(detector: Any, history: Sequence[Any], gen_threshold: float) -> str:
    """``tau_gen: step S (...)`` or ``tau_gen: not flagged (why, in words)`` for one run."""
    event = detector.tau_gen
    if event is not None:
        return f"tau_gen: step {event.step} ({event.reason})"
    values = [(r["step"], r["fid"]) for r in history if r.get("fid") is not None and math.isfinite(r["fid"])]
    if not values:
        return "tau_gen: not flagged (no evaluation measured the Frechet distance)"
    best_step, best = min(values, key=lambda sv: sv[1])
    return (
        f"tau_gen: not flagged (the Frechet distance never fell to {gen_threshold:g}; its best was {best:.1f} at "
        f"step {best_step}): the model copied training digits before its samples were good"
        if detector.tau_mem is not None
        else f"tau_gen: not flagged (the Frechet distance never fell to {gen_threshold:g}; its best was {best:.1f} "
        f"at step {best_step})"
    )


def stopper_line(stopper: Any, detector: Any, steps: int, max_steps: int) -> str:
    """The early stopping's outcome for one run, in one plain line: where it stopped, which weights it kept."""
    tau_mem = detector.tau_mem
    if stopper.stopped_step is None:
        return (
            f"not stopped: tau_mem was not flagged within the cap of {max_steps} steps; the final weights "
            f"(step {steps}) stay"
        )
    onset = f"tau_mem = step {tau_mem.step}, flagged at step {stopper.stopped_step}" if tau_mem is not None else ""
    if stopper.restored_step is None:
        return f"stopped at step {stopper.stopped_step} ({onset}); no evaluation before the onset to restore"
    quality = "" if stopper.best_score is None else f", Frechet distance {stopper.best_score:.1f}"
    f_mem = "" if stopper.best_f_mem is None else f", f_mem {stopper.best_f_mem:.3f}"
    return (
        f"stopped at step {stopper.stopped_step} ({onset}); restored the weights of step {stopper.restored_step}"
        f"{quality}{f_mem}: the best evaluation before the onset"
    )


def train_one(config: DemoConfig, n: int, classifier_state: dict[str, Tensor]) -> dict[str, Any]:
    """Train the run with ``n`` training digits until shortly after tau_mem (or the step cap).

    Writes ``<out>/logs/n<n>/`` (TensorBoard events, ``memwatch_run.json``) and returns the run's online
    results (taus as flagged during training, steps, timings).
    """
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_memwatch import FID, EvalSchedule, MemorizationEarlyStopping, MemWatch, TimescaleDetector
    from lightning_memwatch.apps.data import DigitsDataModule
    from lightning_memwatch.apps.report import write_run_metadata

    start = time.perf_counter()
    L.seed_everything(config.seed + n, verbose=False)
    datamodule = DigitsDataModule(
        n=n,
        num_heldout=config.num_heldout,
        full_batch=True,
        split_seed=config.seed,
        passes_per_epoch=config.passes_per_epoch,
        labelled=config.conditional,
    )
    datamodule.setup("fit")
    classifier = DigitFeatureNet()
    classifier.load_state_dict(classifier_state)
    classifier.eval().requires_grad_(False)

    period = config.eval_period(n)
    detector = TimescaleDetector(**config.detector_kwargs())
    watch = MemWatch(
        train_data=datamodule.train_images(),
        num_samples=config.num_samples,
        sample_batch_size=config.num_samples,
        schedule=EvalSchedule.every(period, include_zero=True),
        fid=FID(reference=datamodule.heldout_images(), feature_extractor=classifier, cache=False),
        seed=config.seed,
        detector=detector,
        bootstrap=config.bootstrap,
        log_images=config.log_images,
        verbose=False,
        train_labels=datamodule.train_labels() if config.conditional else None,
    )
    stopper = MemorizationEarlyStopping(watch, restore_best=True)  # patience lives in the detector
    log_root = config.out / "logs"
    logger = TensorBoardLogger(save_dir=str(log_root), name="", version=config.run_name(n), default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metadata: dict[str, Any] = {
        "n": n,
        "label": f"digits n={n}",
        "quality_label": QUALITY_LABEL,
        "detector": detector.config(),
        "eval_every": period,
        "max_steps": config.max_steps(n),
        "settings": config.to_dict(),
    }
    write_run_metadata(run_dir, **metadata)

    def progress(trainer: Any, module: Any, record: dict[str, Any]) -> None:
        for name in ("tau_gen", "tau_mem"):
            event = getattr(detector, name)
            if event is not None and event.confirmed_step == record["step"]:
                _say(f"  [n={n:>4}] {name} flagged at step {event.step}: {event.reason}")

    watch.add_listener(progress)
    model = _diffusion_model(config, n)
    callbacks: list[Any] = [watch, stopper]
    if config.ema_decay is not None:
        callbacks.insert(0, _ema_warmup_callback(config.ema_decay))
    trainer = L.Trainer(
        max_steps=config.max_steps(n),
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=period,  # MemWatch's scalars reach the logger at evaluation steps
        accelerator="cpu",
        devices=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    _say(
        f"  [n={n:>4}] training: full batch of {n}"
        + (f" x {config.noise_draws(n)} noise draws" if config.noise_draws(n) > 1 else "")
        + f", evaluation every {period} steps, "
        f"cap {config.max_steps(n)} steps"
    )
    trainer.fit(model, datamodule=datamodule)
    wall = time.perf_counter() - start
    eval_seconds = sum(r.get("sample_seconds", 0.0) + r.get("metric_seconds", 0.0) for r in watch.history)
    steps = int(trainer.global_step)
    result = {
        "n": n,
        "steps": steps,
        "tau_gen_online": watch.tau_gen,
        "tau_mem_online": watch.tau_mem,
        "stopped_early": stopper.stopped_step is not None,
        "best_step": stopper.best_step,
        "restored_step": stopper.restored_step,
        "num_evaluations": len(watch.history),
        "wall_seconds": wall,
        "eval_seconds": eval_seconds,
        "ms_per_step": 1000.0 * max(wall - eval_seconds, 0.0) / max(steps, 1),
        "log_dir": str(run_dir),
    }
    if config.conditional:  # per-class onsets and the most-copied training digits
        result.update(_conditional_result(watch, n, datamodule.train_labels()))
    write_run_metadata(run_dir, **metadata, result=result)
    last = watch.history[-1] if watch.history else {}
    _say(
        f"  [n={n:>4}] done at step {steps} in {wall:.0f} s ({result['ms_per_step']:.1f} ms/step training, "
        f"{eval_seconds:.0f} s in {len(watch.history)} evaluations); last f_mem = {last.get('f_mem', float('nan')):.3f}"
    )
    _say(f"  [n={n:>4}] {tau_gen_line(detector, watch.history, config.gen_threshold)}")
    _say(f"  [n={n:>4}] {stopper_line(stopper, detector, steps, config.max_steps(n))}")
    return result


def _conditional_result(watch: Any, n: int, train_labels: Tensor) -> dict[str, Any]:
    """A conditional run's per-class onsets (steps), its classes' sizes and most-copied digits, said on the console."""
    onsets = {int(k): e.step for k, e in sorted(watch.detector.class_tau_mem.items())}
    copied = [dataclasses.asdict(r) for r in watch.copied_training_images()[:10]]
    sizes = {int(k): int(v) for k, v in zip(*torch.unique(train_labels, return_counts=True), strict=True)}
    first = min(onsets.values()) if onsets else None
    flagged_first = [k for k, s in onsets.items() if s == first]
    _say(
        f"  [n={n:>4}] per-class tau_mem: "
        + (", ".join(f"class {k} at {s}" for k, s in onsets.items()) or "none")
        + (f"; first: class(es) {flagged_first}" if flagged_first else "")
    )
    for row in copied[:5]:
        _say(
            f"  [n={n:>4}]   training digit {row['train_index']} (class {row['label']}) copied "
            f"{row['times_copied']} times, steps {row['first_step']}-{row['last_step']}"
        )
    return {"class_tau_mem": onsets, "class_sizes": sizes, "copied_training_images": copied}


# ------------------------------------------------------------------------------------------------------------
# the whole demo


def _prepare_classifier(config: DemoConfig) -> tuple[DigitFeatureNet, dict[str, Any]]:
    from lightning_memwatch.apps.data import DigitsDataModule

    pool_n = NUM_DIGITS - config.num_heldout
    data = DigitsDataModule(n=pool_n, num_heldout=config.num_heldout, split_seed=config.seed)
    data.setup("fit")
    heldout, heldout_labels = data.heldout_images(), data.heldout_labels()
    net = train_digit_classifier(heldout, heldout_labels, epochs=config.classifier_epochs, seed=config.seed)
    pool, pool_labels = data.train_images(), data.train_labels()
    noise = torch.randn(pool.shape, generator=torch.Generator().manual_seed(config.seed)).clamp(-1, 1)
    info: dict[str, Any] = {
        "classifier_train_accuracy": classifier_accuracy(net, heldout, heldout_labels),
        "classifier_accuracy_on_training_pool": classifier_accuracy(net, pool, pool_labels),
        # reference points of the quality scale: the training sets themselves, and noise
        "frechet_training_digits": {
            str(n): classifier_frechet_distance(net, pool[:n], heldout) for n in sorted(config.ns)
        },
        "frechet_noise": classifier_frechet_distance(net, noise, heldout),
    }
    return net, info


def _run_all(config: DemoConfig, state: dict[str, Tensor]) -> list[dict[str, Any]]:
    order = sorted(config.ns, reverse=True)  # longest runs first: the workers finish together
    if config.workers == 1 or len(order) == 1:
        previous = torch.get_num_threads()
        torch.set_num_threads(config.threads_per_worker)
        try:
            return [train_one(config, n, state) for n in order]
        finally:
            torch.set_num_threads(previous)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=min(config.workers, len(order)),
        mp_context=context,
        initializer=_worker_init,
        initargs=(config.threads_per_worker,),
    ) as pool:
        futures = [pool.submit(train_one, config, n, state) for n in order]
        return [f.result() for f in futures]


class OutputFolderNotEmptyError(FileExistsError):
    """``--out`` already holds files: the report would read the old runs together with the new ones."""


def prepare_output(out: Path, *, overwrite: bool = False) -> None:
    """Refuse an output folder that holds anything, or with ``overwrite`` remove the demo's outputs there.

    Raises:
        OutputFolderNotEmptyError: ``out`` holds files and ``overwrite`` is False, or it holds files that are not
            the demo's (which ``overwrite`` leaves alone).
    """
    out = Path(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    if not overwrite:
        raise OutputFolderNotEmptyError(
            f"The output folder {out} already holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''}: "
            "memwatch report would fit tau_mem over those runs and the new ones together. Pass another --out, "
            "or --overwrite to replace the demo's outputs there."
        )
    foreign = [name for name in held if name not in _OUTPUTS]
    if foreign:
        raise OutputFolderNotEmptyError(
            f"--overwrite replaces only the demo's outputs, and {out} also holds {', '.join(foreign[:4])}: "
            "pass an empty or new --out."
        )
    import shutil

    for name in held:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def program_here(name: str) -> str:
    """How to call the command ``name`` installed beside this Python: its bare name when ``PATH`` finds that
    one, else its path (relative to the working directory when inside it), as ``.venv/bin/tensorboard`` after
    ``make demo``, whose venv is not activated."""
    import shutil

    beside = Path(sys.executable).with_name(name)
    on_path = shutil.which(name)
    if not beside.exists() or (on_path is not None and Path(on_path).resolve() == beside.resolve()):
        return name
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def tensorboard_command(logdir: Path) -> str:
    """``tensorboard --logdir LOGDIR --host 127.0.0.1``, with the ``tensorboard`` of this environment
    (:func:`program_here`)."""
    return f"{program_here('tensorboard')} --logdir {logdir} --host 127.0.0.1"


def run_demo(
    config: DemoConfig | None = None, *, overwrite: bool = False, echo: Callable[[str], None] = _say
) -> dict[str, Any]:
    """Run the demo: classifier, one training run per n, then the report. Returns the report's summary.

    With ``workers > 1`` the runs go to spawned processes: call it from a script's
    ``if __name__ == "__main__":`` block (as for any spawn-based multiprocessing), or set ``workers=1``.

    Args:
        config: settings (default: the full demo, :class:`DemoConfig`).
        overwrite: replace the demo's outputs in ``config.out`` (else a folder holding anything is refused).
        echo: where progress lines go (default: print).

    Raises:
        OutputFolderNotEmptyError: ``config.out`` holds files (see :func:`prepare_output`).

    Returns:
        The ``summary.json`` content (:func:`lightning_memwatch.apps.report.report`), plus ``"demo"``: timings and
        the online results of each run.
    """
    config = config or DemoConfig()
    prepare_output(config.out, overwrite=overwrite)
    with _quieted():
        return _run_demo(config, echo)


def _run_demo(config: DemoConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    from lightning_memwatch.apps.report import report
    from lightning_memwatch.tensorboard_layout import dashboard_url

    start = time.perf_counter()
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    echo("memwatch demo: scikit-learn digits (8x8, rescaled to [-1, 1]), DDPM + residual-MLP denoiser, CPU")
    echo(
        f"  n = {', '.join(map(str, config.ns))} training digits (full batch"
        + (f", repeated to {config.draws_per_step} noisy copies per step" if config.draws_per_step else "")
        + f"), {config.num_heldout} held-out digits; "
        f"denoiser width {config.width} x {config.num_blocks} blocks, Adam lr {config.lr:g}, "
        f"EMA {config.ema_decay if config.ema_decay is not None else 'off'}"
    )
    echo(
        f"  each evaluation: DDIM-{config.sample_steps} (eta = 0) from {config.num_samples} fixed noises; "
        "f_mem = fraction with d1/d2 < 1/3; Frechet distance in a held-out-trained digit classifier's features"
    )
    echo(
        f"  detector: tau_gen when Frechet distance <= {config.gen_threshold:g}; tau_mem when f_mem > "
        f"{config.mem_threshold:g}"
        + (f" at {config.mem_patience} evaluations in a row (dated at the first)" if config.mem_patience > 1 else "")
        + "; training stops when tau_mem is flagged and ends with the best weights from before it"
    )
    for line in demo_objects(config):  # the objects each run builds, as built
        echo(f"  {line}")
    classifier, info = _prepare_classifier(config)
    torch.save(classifier.state_dict(), out / CLASSIFIER_FILENAME)
    echo(
        f"  digit classifier: {100 * info['classifier_accuracy_on_training_pool']:.1f}% accuracy on the "
        f"training pool (trained on the held-out digits)"
    )
    real = ", ".join(f"n={n}: {v:.1f}" for n, v in info["frechet_training_digits"].items())
    echo(
        f"  Frechet distance to the held-out digits of the real training sets {real}; of clipped Gaussian "
        f"noise: {info['frechet_noise']:.0f}"
    )
    echo(f"  {len(config.ns)} runs in {min(config.workers, len(config.ns))} worker process(es), "
         f"{config.threads_per_worker} thread(s) each")
    state = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
    train_start = time.perf_counter()
    results = _run_all(config, state)
    train_seconds = time.perf_counter() - train_start
    summary = report(out, plots=config.plots, echo=echo)
    total = time.perf_counter() - start
    summary["demo"] = {
        "wall_seconds": total,
        "training_seconds": train_seconds,
        "runs": sorted(results, key=lambda r: r["n"]),
        "classifier": info,
        "settings": config.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    echo(f"  wall time: {total:.0f} s ({train_seconds:.0f} s of training runs)")
    echo(f"  TensorBoard: {tensorboard_command(out / 'logs')}")
    echo(f"    then open {dashboard_url()}   (MemWatch's charts, smoothing off)")
    echo(f"  the report again, from the logs alone: {program_here('memwatch')} report {out}")
    return summary


# ------------------------------------------------------------------------------------------------------------
# command line


def build_parser() -> Any:
    """The ``memwatch demo`` argument parser (argparse)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="memwatch demo",
        description="Train small diffusion models on scikit-learn digits for several n on CPU and watch them "
        "generalize (tau_gen), then memorize (tau_mem proportional to n).",
    )
    d = DemoConfig()
    add = parser.add_argument
    add("--out", type=Path, default=None, help=f"output directory ({d.out}; with --quick {QUICK_OUT})")
    add("--overwrite", action="store_true", help="replace the demo's outputs in a --out that holds some")
    add("--quick", action="store_true", help="smoke run of under a minute (tiny n, few steps)")
    add("--n", type=int, nargs="+", default=None, help=f"training-set sizes ({' '.join(map(str, d.ns))})")
    add("--workers", type=int, default=None, help=f"runs side by side ({d.workers})")
    add("--threads", type=int, default=None, help=f"torch threads per run ({d.threads_per_worker})")
    add("--ema", type=float, default=None, help=f"EMA decay of the sampled weights ({d.ema_decay}); 0: off")
    add("--num-samples", type=int, default=None, help=f"samples per evaluation ({d.num_samples})")
    add("--gen-threshold", type=float, default=None, help=f"tau_gen: Frechet distance <= ({d.gen_threshold:g})")
    add("--mem-threshold", type=float, default=None, help=f"tau_mem: f_mem > this ({d.mem_threshold:g})")
    add("--seed", type=int, default=None, help=f"seed of the split, weights and noise ({d.seed})")
    add("--no-images", action="store_true", help="do not log sample grids to TensorBoard")
    add("--finetune", action="store_true", help="fine-tune on 16 images of one digit after pretraining on the "
        "other nine (or loading that checkpoint from --out), MemWatch's defaults throughout (docs/finetune.md)")
    add("--conditional", action="store_true", help="class-conditional models: per-class onsets, copied digits")
    return parser


def config_from_args(args: Any) -> DemoConfig:
    """Turn parsed ``memwatch demo`` arguments into a :class:`DemoConfig`."""
    default_out = QUICK_OUT if args.quick else DemoConfig.out
    if args.conditional:  # its own folder: never mixed with the unconditional runs
        default_out = default_out.with_name(f"{default_out.name}-conditional")
    overrides: dict[str, Any] = {"out": args.out if args.out is not None else default_out}
    pairs = {
        "ns": args.n,
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "num_samples": args.num_samples,
        "gen_threshold": args.gen_threshold,
        "mem_threshold": args.mem_threshold,
        "seed": args.seed,
    }
    overrides.update({k: (tuple(v) if k == "ns" else v) for k, v in pairs.items() if v is not None})
    if args.ema is not None:
        overrides["ema_decay"] = None if args.ema == 0 else args.ema
    if args.no_images:
        overrides["log_images"] = False
    if args.conditional:
        overrides["conditional"] = True
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """``memwatch demo [--out DIR] [--quick] [--n 64 128 ...] ...``: run the demo; returns the exit code (0)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.finetune:  # apps/finetune.py: its own settings; --out (when given), --seed and --threads apply
        from lightning_memwatch.apps.finetune import FinetuneConfig, run_finetune

        given: dict[str, Any] = {"out": args.out} if args.out is not None else {}
        given.update({k: v for k, v in (("seed", args.seed), ("threads", args.threads)) if v is not None})
        run_finetune(FinetuneConfig(**given))
        return 0
    config = config_from_args(args)
    try:
        run_demo(config, overwrite=args.overwrite)
    except OutputFolderNotEmptyError as err:
        parser.error(str(err))  # exit code 2, the message on stderr
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main(sys.argv[1:]))

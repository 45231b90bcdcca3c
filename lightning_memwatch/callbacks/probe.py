"""LossGapProbe: a sampling-free memorization probe, the train / held-out denoising-loss gap every K steps.

Every ``every_n_train_steps`` optimizer steps (and at step 0) the module's denoising loss is measured on a
fixed set of (x0, t, noise) triples drawn once from the training images and, with the same t and noise, from
held-out images (:mod:`lightning_memwatch.metrics.loss_gap` has the maths). Logged as :data:`LOSS_GAP`, the
relative gap ``(L_heldout - L_train) / L_heldout``, and per noise-level band as ``memwatch/loss_gap/t0001-0250``
etc. A few forward passes, no sampling: by default it costs at most 1% of training compute.

The loss comes from whatever samples, through the optional part of the sampler contract. A module that
samples itself provides::

    def denoising_loss(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:  # per-sample loss (B,)
    num_timesteps: int                                                           # t lies in [1, T)

(:meth:`lightning_memwatch.apps.models.DDPM.denoising_loss` is the reference); a ``sample_fn`` adapter provides
the same with the module first, ``denoising_loss(pl_module, x0, t, noise)`` and ``num_timesteps(pl_module)``
(:class:`~lightning_memwatch.adapters.DiffusersSampler`, ``PipelineSampler``, ``LucidrainsSampler``). The probe
takes, in this order: ``loss_fn=``, ``sampler=``, the adapter a MemWatch samples with, the module's method.
Readings use the weights that MemWatch scores (``MemWatch(weights=...)``), swapped in as for an evaluation.

A class-conditional model (its sampler takes ``labels``) is probed with its classes: the loss takes a
``labels`` argument, ``denoising_loss(x0, t, noise, labels)`` (the adapters' and the reference DDPM's do), each
training image is paired with a held-out image of its class, and both are scored asking for that class. The
labels are given (``train_labels=``, ``heldout_labels=``), or the paired MemWatch's (``MemWatch(train_labels=)``
for its training images), or the datamodule's (``train_labels()``, ``heldout_labels()``), or read from
``(image, label)`` data as MemWatch reads them.

The training images are, unless given, the paired MemWatch's (the images it searches for copies); only the
``num_triples`` drawn rows of each set are read, once per fit.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_memwatch._checks import config_error, config_type_error, images_of_batch
from lightning_memwatch.callbacks._scalars import log_scalars
from lightning_memwatch.callbacks._trainer import (
    datamodule_labels_of,
    heldout_images_of,
    train_images_of,
    train_loader_of,
)
from lightning_memwatch.labels import read_train_labels
from lightning_memwatch.metrics.loss_gap import (
    LossGapReading,
    ProbeTriples,
    band_names,
    draw_probe_triples,
    loss_sums,
    probe_period,
    reading_from_sums,
)
from lightning_memwatch.weights import scoring

__all__ = ["LOSS_GAP", "PROBE_LOSS_HELDOUT", "PROBE_LOSS_TRAIN", "LossGapProbe"]

LOSS_GAP = "memwatch/loss_gap"
"""Logged key of the relative loss gap; the bands are ``memwatch/loss_gap/<band name>``."""
PROBE_LOSS_TRAIN = "memwatch/probe_loss_train"
PROBE_LOSS_HELDOUT = "memwatch/probe_loss_heldout"

ProbeListener = Callable[[LossGapReading], None]
LossCallable = Callable[..., Tensor]
"""``loss_fn(pl_module, x0, t, noise) -> per-sample loss (B,)``; the probe's own loss of a class-conditional
model also takes the classes, ``(pl_module, x0, t, noise, labels)``."""


def _class_conditional(source: Any, pl_module: LightningModule) -> bool:
    """Whether the model the loss source reads is class-conditional: its adapter says so
    (``takes_labels(pl_module)``), or the module's own ``sample`` names ``labels``."""
    from lightning_memwatch.sampling import accepts_labels

    takes_labels = getattr(source.sampler, "takes_labels", None)
    if callable(takes_labels):
        return bool(takes_labels(pl_module))
    sample = getattr(pl_module, "sample", None)
    return source.sampler is None and callable(sample) and accepts_labels(sample)


def _provides_loss(sampler: Any) -> bool:
    """Whether a ``sample_fn`` adapter has the loss part of the sampler contract."""
    return callable(getattr(sampler, "denoising_loss", None)) and callable(getattr(sampler, "num_timesteps", None))


@dataclasses.dataclass(frozen=True)
class _LossSource:
    """The probe's loss, resolved once at setup: ``loss(pl_module, x0, t, noise)``, ``num_timesteps(pl_module)``."""

    loss: LossCallable
    num_timesteps: Callable[[LightningModule], Any]
    name: str
    sampler: Any = None
    takes_labels: bool = False  # a class-conditional model's loss, called with the triples' classes


class LossGapProbe(Callback):
    """Log the relative gap between the denoising loss on training and held-out images every K steps.

    Example:
        >>> probe = LossGapProbe(num_triples=256, every_n_train_steps=100)
        >>> probe.history
        []

    Args:
        heldout_data: held-out images (Tensor / Dataset / DataLoader, never trained on); None takes the
            datamodule's ``reference_images()`` (the FID reference), else its ``heldout_images()``.
        train_data: training images; None takes those of the paired MemWatch (its ``train_data``), else the
            datamodule's ``train_images()``, else the images of the training loader. Only the drawn rows are read.
        num_triples: triples per set (images): M training and M held-out forward passes per reading.
        num_bands: equal-width noise-level bands of ``[1, T)`` logged separately.
        every_n_train_steps: optimizer steps between readings, or ``"auto"``: the smallest period whose compute
            is at most ``budget`` of training's, from the first batch's size (:func:`probe_period`).
        budget: fraction of training compute the ``"auto"`` period allows (0.01: 1%).
        loss_fn: ``loss_fn(pl_module, x0, t, noise) -> (B,)``; it overrides ``sampler``.
        num_timesteps: T of the diffusion; default the loss source's (``sampler.num_timesteps(pl_module)``, else
            ``pl_module.num_timesteps``).
        sampler: a ``sample_fn`` adapter that provides the loss (``DiffusersSampler``, ``PipelineSampler``,
            ``LucidrainsSampler``: ``denoising_loss(pl_module, x0, t, noise)`` and ``num_timesteps(pl_module)``).
            None: the adapter a MemWatch callback samples with (``MemWatch(sample_fn=adapter)``) when it has the
            loss, else ``pl_module.denoising_loss``.
        batch_size: triples per loss call (images).
        seed: seed of the triples (same on every rank and every run).
        verbose: print one line per reading (rank 0).
        train_labels: class of each training image (LongTensor, in data order) of a class-conditional model;
            default the paired MemWatch's ``train_labels`` when the images are its training images, the
            datamodule's ``train_labels()`` when they are its ``train_images()``, else the second tensor of the
            training data's batches.
        heldout_labels: class of each held-out image; default the datamodule's ``heldout_labels()`` when the
            images are its held-out images, else the second tensor of ``heldout_data``'s batches.
    """

    def __init__(
        self,
        heldout_data: Any = None,
        train_data: Any = None,
        num_triples: int = 256,
        num_bands: int = 4,
        every_n_train_steps: int | str = "auto",
        budget: float = 0.01,
        loss_fn: LossCallable | None = None,
        num_timesteps: int | None = None,
        batch_size: int = 512,
        seed: int = 0,
        verbose: bool = False,
        sampler: Any = None,
        train_labels: Tensor | None = None,
        heldout_labels: Tensor | None = None,
    ) -> None:
        if isinstance(every_n_train_steps, str):
            if every_n_train_steps != "auto":
                raise config_error(
                    f"every_n_train_steps must be a positive int or 'auto'; got {every_n_train_steps!r}."
                )
        elif isinstance(every_n_train_steps, bool) or int(every_n_train_steps) < 1:
            raise config_error(
                "every_n_train_steps must be a positive number of optimizer steps (or 'auto' for a "
                f"{budget:.0%} compute budget); got {every_n_train_steps!r}."
            )
        if not 0.0 < budget <= 1.0:
            raise config_error(f"budget must lie in (0, 1] (a fraction of training compute); got {budget}.")
        if sampler is not None and not _provides_loss(sampler):
            raise config_type_error(
                f"sampler must provide the probe's loss (`denoising_loss(pl_module, x0, t, noise)` and "
                f"`num_timesteps(pl_module)`, as DiffusersSampler, PipelineSampler and LucidrainsSampler do); "
                f"{type(sampler).__name__} does not. Pass `loss_fn=` for another sampler."
            )
        if num_triples < 1 or num_bands < 1 or batch_size < 1:
            raise config_error(
                f"num_triples, num_bands and batch_size must be >= 1; got {num_triples}, {num_bands}, {batch_size}."
            )
        self.heldout_data = heldout_data
        self.train_data = train_data
        self.num_triples = int(num_triples)
        self.num_bands = int(num_bands)
        self.every_n_train_steps = every_n_train_steps
        self.budget = float(budget)
        self.loss_fn = loss_fn
        self.num_timesteps = num_timesteps
        self.sampler = sampler
        self.train_labels = train_labels
        self.heldout_labels = heldout_labels
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.verbose = verbose
        self.history: list[LossGapReading] = []
        self._triples: ProbeTriples | None = None
        self._source: _LossSource | None = None
        self._watch: Any = None  # the MemWatch whose scored weights (raw, EMA, averaged) the readings use
        self._period: int | None = None if every_n_train_steps == "auto" else int(every_n_train_steps)
        self._last_step: int | None = None
        self._listeners: list[ProbeListener] = []

    # -- views ----------------------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            num_triples=self.num_triples,
            num_bands=self.num_bands,
            every_n_train_steps=self.every_n_train_steps,
            seed=self.seed,
        )

    @property
    def period(self) -> int | None:
        """Optimizer steps between readings (None until ``"auto"`` has seen the first batch)."""
        return self._period

    @property
    def triples(self) -> ProbeTriples | None:
        """The fixed probe set (after setup)."""
        return self._triples

    @property
    def latest(self) -> LossGapReading | None:
        """The last reading, or None."""
        return self.history[-1] if self.history else None

    @property
    def seconds(self) -> float:
        """Wall time spent in readings on this rank so far (s)."""
        return float(sum(r.seconds for r in self.history))

    def add_listener(self, fn: ProbeListener) -> None:
        """Call ``fn(reading)`` on every rank after each reading (the same reading everywhere)."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def is_probe_step(self, step: int) -> bool:
        """Whether a reading is due at optimizer step ``step`` (step 0, then every ``period`` steps)."""
        return self._period is not None and step % self._period == 0

    # -- set-up ----------------------------------------------------------------------------------------
    def _memwatch_samplers(self, trainer: Trainer | None) -> list[Any]:
        """The distinct ``sample_fn`` adapters of the trainer's MemWatch callbacks that provide the loss."""
        from lightning_memwatch.callbacks.memwatch import MemWatch

        found: list[Any] = []
        for callback in getattr(trainer, "callbacks", None) or []:
            fn = getattr(callback, "sample_fn", None) if isinstance(callback, MemWatch) else None
            if _provides_loss(fn) and all(fn is not other for other in found):
                found.append(fn)
        return found

    def _resolve_loss(self, trainer: Trainer | None, pl_module: LightningModule) -> _LossSource:
        """Where the loss comes from (``loss_fn``, ``sampler``, MemWatch's adapter, or the module, in that
        order); a class-conditional model's must take its classes (``labels``) unless ``loss_fn`` is given."""
        from lightning_memwatch.sampling import accepts_labels

        source = self._loss_source(trainer, pl_module)
        if self.loss_fn is not None or not _class_conditional(source, pl_module):
            return source
        method = source.sampler.denoising_loss if source.sampler is not None else pl_module.denoising_loss
        if not accepts_labels(method):
            raise config_error(
                f"LossGapProbe: {type(pl_module).__name__} is class-conditional (its sampler takes `labels`), and "
                f"{source.name} takes no class: the probe's loss on (x0, t, noise) would fail or measure another "
                "model. Give it a `labels` argument (`denoising_loss(x0, t, noise, labels=None)`), remove the "
                "LossGapProbe for this model, or pass `LossGapProbe(loss_fn=lambda module, x0, t, noise: ..., "
                "num_timesteps=T)` that conditions as you choose (e.g. on the null class of classifier-free guidance)."
            )
        return dataclasses.replace(source, takes_labels=True)

    def _loss_source(self, trainer: Trainer | None, pl_module: LightningModule) -> _LossSource:
        module_name = type(pl_module).__name__
        if self.loss_fn is not None:
            return _LossSource(self.loss_fn, lambda m: getattr(m, "num_timesteps", None), "loss_fn")
        sampler = self.sampler
        if sampler is None:
            adapters = self._memwatch_samplers(trainer)
            if len(adapters) > 1:
                raise config_error(
                    f"LossGapProbe: {len(adapters)} MemWatch callbacks sample with different adapters that each "
                    "have a `denoising_loss`; say which one the probe uses: `LossGapProbe(sampler=...)`."
                )
            sampler = adapters[0] if adapters else None
        if sampler is not None:
            return _LossSource(
                sampler.denoising_loss, sampler.num_timesteps, f"{type(sampler).__name__}.denoising_loss", sampler
            )
        if callable(getattr(pl_module, "denoising_loss", None)):
            return _LossSource(
                lambda m, x0, t, noise, *labels: m.denoising_loss(x0, t, noise, *labels),
                lambda m: getattr(m, "num_timesteps", None),
                f"{module_name}.denoising_loss",
            )
        raise AttributeError(
            f"LossGapProbe found no denoising loss: {module_name} has no `denoising_loss` method and no MemWatch "
            "samples with an adapter that has one. Either (1) give the module `def denoising_loss(self, x0, t, "
            "noise) -> Tensor` (the per-sample loss (B,)) and a `num_timesteps` attribute; (2) sample with an "
            "adapter that provides it (DiffusersSampler, PipelineSampler, LucidrainsSampler) as "
            "`MemWatch(sample_fn=adapter)` or `LossGapProbe(sampler=adapter)`; or (3) pass "
            "`LossGapProbe(loss_fn=lambda module, x0, t, noise: ..., num_timesteps=T)`."
        )

    @staticmethod
    def _paired_watch(trainer: Trainer | None, source: _LossSource) -> Any:
        """The MemWatch whose scored weights the probe reads: the one sampling with the probe's adapter, else
        the trainer's only MemWatch, else None (the weights in the module)."""
        from lightning_memwatch.callbacks.memwatch import MemWatch

        watches = [cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, MemWatch)]
        for watch in watches:
            if source.sampler is not None and watch.sample_fn is source.sampler:
                return watch
        return watches[0] if len(watches) == 1 else None

    def _timesteps(self, source: _LossSource, pl_module: LightningModule) -> int:
        value = self.num_timesteps if self.num_timesteps is not None else source.num_timesteps(pl_module)
        if value is None or int(value) < 2:
            raise config_error(
                f"LossGapProbe needs the number of diffusion steps T of {source.name}: give "
                f"{type(pl_module).__name__} a `num_timesteps` attribute or pass `LossGapProbe(num_timesteps=...)`; "
                f"got {value!r}."
            )
        return int(value)

    def _find_sources(self, trainer: Trainer) -> tuple[Any, Any, dict[str, str]]:
        """The training and held-out image sources (Tensor, Dataset or DataLoader), and where each came from
        (``origin["train"]``, ``origin["heldout"]``: ``"given"``, ``"watch"`` (the paired MemWatch's training
        images), ``"datamodule"`` or ``"loader"``)."""
        watch_data = getattr(self._watch, "train_data", None)
        origin = {"train": "given", "heldout": "given"}
        train = self.train_data
        if train is None and watch_data is not None:
            train, origin["train"] = watch_data, "watch"
        if train is None:
            train, origin["train"] = train_images_of(trainer), "datamodule"
        if train is None:
            # the datamodule's, or the loaders given to trainer.fit: what a paired MemWatch without train_data reads
            train = train_loader_of(trainer)
            origin["train"] = "watch" if self._watch is not None else "loader"
        if train is None:
            raise config_error(
                "LossGapProbe found no training images: pass `LossGapProbe(train_data=...)`, give trainer.fit a "
                "train dataloader, or use a datamodule with `train_images()` or `train_dataloader()`."
            )
        heldout = self.heldout_data
        if heldout is None:
            heldout, origin["heldout"] = heldout_images_of(trainer), "datamodule"
        if heldout is None:
            raise config_error(
                "LossGapProbe found no held-out images: pass `LossGapProbe(heldout_data=...)` (images never "
                "trained on, e.g. the FID reference) or give the datamodule a `reference_images()` method."
            )
        return train, heldout, origin

    def _labels(self, trainer: Trainer, train: Any, heldout: Any, origin: dict[str, str]) -> tuple[Tensor, Tensor]:
        """The classes of the training and held-out images of a class-conditional model: given, else the paired
        MemWatch's ``train_labels`` for its training images, else the datamodule's (``train_labels()``,
        ``heldout_labels()``) for its images, else read from ``(image, label)`` data."""
        found = []
        for given, source, name in ((self.train_labels, train, "train"), (self.heldout_labels, heldout, "heldout")):
            labels = given
            if labels is None and origin[name] == "watch":  # set up already when the MemWatch comes first
                labels = getattr(self._watch, "training_classes", None)
                labels = labels if labels is not None else getattr(self._watch, "train_labels", None)
            if labels is None and origin[name] == "datamodule":
                labels = datamodule_labels_of(trainer, f"{name}_labels")
            if labels is None:
                labels = read_train_labels(source, f"{name}_data")
            if labels is None:
                raise config_error(
                    f"LossGapProbe: the model is class-conditional and the {name} images carry no classes: the "
                    f"probe scores each image asking for its class. Pass `LossGapProbe({name}_labels=<LongTensor, "
                    f"one class per image>)`, {name} data of `(image, label)` items, or a datamodule with "
                    f"`{name}_labels()`."
                )
            found.append(labels)
        return found[0], found[1]

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._source = self._resolve_loss(trainer, pl_module)  # fails here, before training, when there is none
        self._watch = self._paired_watch(trainer, self._source)
        num_timesteps = self._timesteps(self._source, pl_module)
        if self._triples is None:
            train, heldout, origin = self._find_sources(trainer)
            labels = (None, None)
            if self._source.takes_labels:
                labels = self._labels(trainer, train, heldout, origin)
            self._triples = draw_probe_triples(  # reads only the drawn rows of each source
                train,
                heldout,
                num_triples=self.num_triples,
                num_timesteps=num_timesteps,
                num_bands=self.num_bands,
                seed=self.seed,
                train_labels=labels[0],
                heldout_labels=labels[1],
            )
        elif self._source.takes_labels != (self._triples.labels is not None):
            raise config_error(
                "LossGapProbe: the probe set restored from the checkpoint was drawn "
                f"{'without' if self._triples.labels is None else 'with'} classes, but the model's loss now "
                f"takes {'them' if self._source.takes_labels else 'none'}: resume with the same model and probe."
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step == 0 and self._last_step != 0:
            self._probe(trainer, pl_module, step, can_log=False)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._period is None:
            self._period = self._auto_period(trainer, batch)
        step = trainer.global_step
        if step % self._period == 0 and step != self._last_step:
            self._probe(trainer, pl_module, step, can_log=True)

    def _auto_period(self, trainer: Trainer, batch: Any) -> int:
        local_batch = len(images_of_batch(batch, "the training batch"))
        share = math.ceil(self.num_triples / max(trainer.world_size, 1))
        period = probe_period(share, local_batch, self.budget)
        period = int(trainer.strategy.broadcast(period, src=0))  # one period on every rank
        rank_zero_info(
            f"LossGapProbe: every {period} optimizer steps ({2 * self.num_triples} forward passes per reading, "
            f"batch of {local_batch} images per rank: <= {self.budget:.0%} of training compute)."
        )
        return period

    # -- one reading ----------------------------------------------------------------------------------
    def _probe(self, trainer: Trainer, pl_module: LightningModule, step: int, *, can_log: bool) -> None:
        assert self._triples is not None, "LossGapProbe.setup did not run"
        start = time.perf_counter()
        world, rank = trainer.world_size, trainer.global_rank
        rows = range(rank, len(self._triples), world)  # every rank takes a strided share
        assert self._source is not None, "LossGapProbe.setup did not run"
        loss_fn = self._source.loss

        def loss(x0: Tensor, t: Tensor, noise: Tensor, *labels: Tensor) -> Tensor:
            return loss_fn(pl_module, x0, t, noise, *labels)

        scored = getattr(self._watch, "scored_weights", None)  # the weights MemWatch samples with
        with scoring(trainer, pl_module, scored), torch.no_grad():
            sums = loss_sums(loss, self._triples, rows, device=trainer.strategy.root_device, batch_size=self.batch_size)
        if world > 1:  # every rank enters: the sums of all shares, on every rank
            sums = trainer.strategy.reduce(sums.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        reading = reading_from_sums(sums, step, time.perf_counter() - start)
        self.history.append(reading)
        self._last_step = step
        self._log(trainer, pl_module, reading, can_log)
        if self.verbose:
            rank_zero_info(
                f"LossGapProbe step {step}: loss gap {reading.gap:+.4f} (train {reading.loss_train:.5f}, "
                f"held-out {reading.loss_heldout:.5f}; {reading.seconds * 1000:.1f} ms)"
            )
        for listener in self._listeners:
            listener(reading)

    def _log(self, trainer: Trainer, pl_module: LightningModule, reading: LossGapReading, can_log: bool) -> None:
        assert self._triples is not None
        values = {
            LOSS_GAP: reading.gap,
            PROBE_LOSS_TRAIN: reading.loss_train,
            PROBE_LOSS_HELDOUT: reading.loss_heldout,
        }
        for name, gap in zip(band_names(self._triples.edges), reading.band_gaps, strict=True):
            values[f"{LOSS_GAP}/{name}"] = gap
        finite = {k: v for k, v in values.items() if math.isfinite(v)}
        log_scalars(trainer, pl_module, finite, reading.step, can_log=can_log)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [r.to_dict() for r in self.history],
            "last_step": self._last_step,
            "period": self._period,
            "triples": self._triples.state_dict() if self._triples is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [LossGapReading.from_dict(r) for r in state_dict["history"]]
        self._last_step = state_dict["last_step"]
        if state_dict.get("period") is not None:
            self._period = int(state_dict["period"])
        triples = state_dict.get("triples")
        if triples is not None:
            self._triples = ProbeTriples.from_state_dict(triples)

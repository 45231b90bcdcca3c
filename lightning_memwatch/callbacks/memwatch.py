"""MemWatch: sample once per scheduled step and measure memorization (and FID) of the samples, live.

The callback is the Lightning adapter of the evaluation core: it decides when to evaluate (the schedule),
which weights are scored, draws the samples on every rank and gathers them, hands them to the
:class:`~lightning_memwatch.Evaluator` (which returns an :class:`~lightning_memwatch.EvalRecord`; under DDP
every rank's evaluator searches its block of the training rows, rank 0's alone computes FID and the user
metrics), broadcasts rank 0's record, logs it, feeds the detector, emits the detector's events and keeps the
state. It does the Lightning plumbing only: sampling rules live in :mod:`lightning_memwatch.sampling`, where
the training images live across the ranks in :mod:`lightning_memwatch.callbacks._train_images`, the datamodule's
conventions in :mod:`lightning_memwatch.callbacks._trainer`, the scored weights in
:mod:`lightning_memwatch.weights`, the maths in :mod:`lightning_memwatch.metrics`, the timescale flags in
:mod:`lightning_memwatch.detection`, and logging helpers in :mod:`lightning_memwatch.log` and
:mod:`lightning_memwatch.callbacks._scalars`.
"""

from __future__ import annotations

import dataclasses
import difflib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_memwatch import _checks, tensorboard_layout
from lightning_memwatch import log as mwlog
from lightning_memwatch._checks import check_sample_range
from lightning_memwatch.callbacks import _copies
from lightning_memwatch.callbacks._scalars import log_scalars
from lightning_memwatch.callbacks._train_images import ImageSource, TrainImages
from lightning_memwatch.callbacks._trainer import data_range_of, fit_ends_with_this_epoch, reference_images_of
from lightning_memwatch.copies import CopiedTrainingImage, CopyTable
from lightning_memwatch.detection import TimescaleDetector, TimescaleEvent
from lightning_memwatch.evaluator import Evaluator, check_metric_names
from lightning_memwatch.hparams import HparamsSession
from lightning_memwatch.images import collect_images
from lightning_memwatch.images import sampler_rows as _sampler_rows  # noqa: F401  (its old home)
from lightning_memwatch.labels import LabelsChoice, labels_key, sample_labels, train_labels_of
from lightning_memwatch.metrics.fid import FID, FIDEvaluator
from lightning_memwatch.metrics.memorization import KnnIndex
from lightning_memwatch.onset import OnsetForecast, detector_level, forecast_onset
from lightning_memwatch.progress import CostNote, EvalProgress, setup_summary
from lightning_memwatch.record import FID_TRAIN_FLOOR, RECORD_FIELDS, EvalRecord, RecordField, listed_keys
from lightning_memwatch.sampling import accepts_labels, draw_samples, gather_in_order, rank_slice, sampler_of
from lightning_memwatch.schedule import EvalSchedule
from lightning_memwatch.value_check import ValueProfile, check_values
from lightning_memwatch.weights import (
    RAW_WARMUP,
    WEIGHTS_NAMES,
    ModuleEMA,
    ScoredWeights,
    WeightsChoice,
    find_weight_averaging,
    resolve_weights,
    scoring,
)

__all__ = ["FID_TRAIN_FLOOR", "MemWatch", "collect_images"]

Listener = Callable[[Trainer, LightningModule, EvalRecord], None]
"""``fn(trainer, pl_module, record)``, called on every rank after each evaluation."""
EventListener = Callable[[Trainer, LightningModule, TimescaleEvent], None]
"""``fn(trainer, pl_module, event)``, called on every rank for each tau_gen / tau_mem event the detector fires."""
KnnSharding = Literal["auto", "sharded", "rank0"]
"""Where ``MemWatch(knn_sharding=...)`` indexes the training images under DDP."""
KNN_SHARDING: tuple[str, ...] = get_args(KnnSharding)


class MemWatch(Callback):
    """Sample at scheduled steps and log the memorization fraction f_mem (and FID) of the samples.

    At each scheduled ``global_step`` (optimizer steps) the module is put in eval mode, ``num_samples``
    images are drawn under ``torch.inference_mode`` from fixed per-sample seeds (see
    :mod:`lightning_memwatch.sampling`), and one sampling pass feeds every metric. A sample is memorized
    when ``d1 / d2 < threshold`` for its nearest and second-nearest training images. Scalars are logged as
    :data:`~lightning_memwatch.log.F_MEM` etc. and can be monitored by ``EarlyStopping``/``ModelCheckpoint``.
    Each evaluation appends an :class:`~lightning_memwatch.EvalRecord` to :attr:`history` (a read-only
    mapping too: ``record["f_mem"]`` works as with the dict records of earlier versions).

    Example:
        >>> from lightning_memwatch import MemWatch, EvalSchedule
        >>> watch = MemWatch(num_samples=1000, schedule=EvalSchedule.every(500))
        >>> watch.history
        []

    Args:
        train_data: training images (Tensor / Dataset / DataLoader); None takes them from the trainer's train
            dataloader at setup (first tensor of each batch, labels dropped).
        num_samples: generated samples per evaluation used for f_mem (images).
        sample_batch_size: samples per sampler call (images).
        schedule: an :class:`EvalSchedule`, an int (every N optimizer steps), ``"auto"`` (the default: every 100
            steps up to 1,000, every 250 up to 2,000, then every 500; :meth:`EvalSchedule.auto`), ``"paper"`` or
            a list of steps.
        sample_fn: ``sample_fn(pl_module, num_samples, generator=..., noise=...)``; default
            ``pl_module.sample``.
        data_range: (low, high) of the samples and the training images; None reads ``data_range`` from the
            datamodule, then from the module, at setup (e.g. the paper's centred data, (-mean, 1 - mean)).
        threshold: memorization ratio threshold (the paper: 1/3).
        fid: :class:`~lightning_memwatch.FID` settings, or None for no FID.
        seed: base seed of the per-sample noise (same noise at every evaluation).
        detector: :class:`~lightning_memwatch.TimescaleDetector` flagging tau_gen / tau_mem (default rules).
        metrics: extra ``{name: fn(generated) -> float}`` computed on the same samples, logged as
            ``memwatch/<name>`` and stored in each record (``record.metrics``; also ``record[name]``). Names
            must differ from the record's fields.
        noise_shape: shape of one sample's initial noise when the sampler takes ``noise``; default the
            training image shape.
        feature_fn: optional map images -> features for feature-space nearest neighbours (latent models).
        knn_backend: ``"auto"``, ``"torch-int8"``, ``"torch-bf16"``, ``"faiss-gpu"``, ``"faiss-cpu"`` or
            ``"torch"`` (docs: offline.md, the "auto" rule).
        bootstrap: bootstrap resamples for the f_mem confidence interval.
        log_images: log sample grids, nearest-neighbour pairs and ratio histograms to the loggers with an image
            API (TensorBoard, Weights & Biases, MLflow; see :mod:`lightning_memwatch.log`).
        verbose: print one line per evaluation (rank 0).
        weights: which weights are scored (see :mod:`lightning_memwatch.weights`): ``"auto"`` (the average of
            a Lightning ``WeightAveraging``/``EMAWeightAveraging`` callback when one is among the trainer's
            callbacks, else the raw weights), ``"averaged"``, ``"raw"``, or ``ModuleEMA("ema", target="net")``
            for an EMA copy the module keeps itself. The module holds the scored weights during the whole
            evaluation (sampling and listeners, e.g. the early stopping's copy).
        knn_sharding: where the training images are indexed under DDP (more than one process and
            ``torch.distributed`` initialised). ``"auto"`` (default) and ``"sharded"``: each rank reads and
            indexes only its contiguous block of the training rows (a
            :class:`~lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex`: no rank holds the
            whole set) and every rank takes part in the nearest-neighbour search of the gathered samples; the
            record is the one a single process computes (exact search, ties merged alike). ``"rank0"``: global
            rank 0 alone reads, checks and indexes the whole set and searches alone (the other ranks read
            nothing). In one process both build the one index.
            FID, the user metrics and image logging run on rank 0 in every mode.
        labels: class-conditional samplers (those naming a ``labels`` parameter): the class each generated
            sample asks for. None (default): sample ``i``'s class is drawn from the training labels'
            frequencies by ``(seed, i)`` alone (the same at every evaluation, batch size and world size);
            ``"balanced"``: equal counts per class; or a LongTensor of ``num_samples`` training classes. See
            :mod:`lightning_memwatch.labels`. Records then hold f_mem per class (``record.per_class``).
        train_labels: the training images' classes (LongTensor, one per image, in dataset order); default the
            second tensor of each training batch. Read only for a class-conditional sampler; they also fill
            the class column of :meth:`copied_training_images`.
    """

    def __init__(
        self,
        train_data: ImageSource | None = None,
        num_samples: int = 1000,
        sample_batch_size: int = 250,
        schedule: EvalSchedule | int | str | Sequence[int] = "auto",
        sample_fn: Callable[..., Tensor] | None = None,
        data_range: tuple[float, float] | None = (-1.0, 1.0),
        threshold: float = 1 / 3,
        fid: FID | None = None,
        seed: int = 0,
        detector: TimescaleDetector | None = None,
        metrics: Mapping[str, Callable[[Tensor], float]] | None = None,
        noise_shape: Sequence[int] | None = None,
        feature_fn: Callable[[Tensor], Tensor] | None = None,
        knn_backend: str = "auto",
        bootstrap: int = 1000,
        log_images: bool = True,
        verbose: bool = True,
        weights: WeightsChoice = "auto",
        knn_sharding: KnnSharding = "auto",
        labels: LabelsChoice = None,
        train_labels: Tensor | None = None,
    ) -> None:
        num_samples = _checks.check_int(num_samples, "num_samples", minimum=2, unit="images")
        sample_batch_size = _checks.check_int(sample_batch_size, "sample_batch_size", minimum=1, unit="images")
        threshold = _checks.check_float(threshold, "threshold", low=0, low_open=True, high=1, hint="the paper uses 1/3")
        seed = _checks.check_int(seed, "seed")
        bootstrap = _checks.check_int(bootstrap, "bootstrap", minimum=1, unit="number of resamples, e.g. 1000")
        self.data_range: tuple[float, float] | None = (
            None if data_range is None else _checks.check_data_range(data_range)
        )
        self.train_data = train_data
        self.num_samples = int(num_samples)
        self.sample_batch_size = int(sample_batch_size)
        self.schedule = EvalSchedule.coerce(schedule)
        self.sample_fn = sample_fn
        self.threshold = float(threshold)
        self.fid = fid
        self.seed = int(seed)
        self.detector = detector if detector is not None else TimescaleDetector()
        self.metrics = check_metric_names(metrics)
        _check_quality_key(self.detector.quality_key, self.metrics)
        self.noise_shape = tuple(noise_shape) if noise_shape is not None else None
        self.feature_fn = feature_fn
        self.knn_backend = knn_backend
        self.bootstrap = int(bootstrap)
        self.log_images = log_images
        self.verbose = verbose
        self.weights = _check_weights(weights)
        self.knn_sharding = _checks.check_choice(
            knn_sharding,
            "knn_sharding",
            KNN_SHARDING,
            hint="'auto'/'sharded': each DDP rank indexes its block of the training rows; 'rank0': rank 0 all rows.",
        )
        self.scored_weights: ScoredWeights | None = None  # resolved at setup
        self._handed_back_step: int | None = None  # the step at which a never-updated average got the raw weights
        self.labels = labels
        self.train_labels = train_labels
        self._train_labels: Tensor | None = None  # class-conditional: every training row's class (set up)
        self._sample_labels: Tensor | None = None  # class-conditional: every generated sample's class (set up)
        self._copies = CopyTable()
        self._last_nearest: tuple[Tensor, Tensor, Tensor] | None = None  # rank 0: this evaluation's pairs

        self.history: list[EvalRecord] = []
        self._listeners: list[Listener] = []
        self._event_listeners: list[EventListener] = []
        self._evaluator: Evaluator | None = None  # rank 0 (every rank when sharded), built in on_fit_start
        self._train: TrainImages | None = None  # where the training images live across the ranks (setup)
        self._fid_evaluator: FIDEvaluator | None = None
        # a FID state loaded before setup built the evaluator (a manual load_state_dict); handed to it at build
        self._pending_fid_state: dict | None = None
        self._last_evaluated_step: int | None = None
        self._overshoot_warned = False
        self._cost = CostNote()  # says once per fit when an evaluation outweighs the training before it
        self.fid_train_floor: float | None = None
        self._values: ValueProfile | None = None  # the training images' values (setup), checked against samples
        self._hparams: HparamsSession | None = None  # this fit's hparams session (rank 0), from on_fit_start

    # -- public read-only views -------------------------------------------------------------------------
    @property
    def state_key(self) -> str:
        return self._generate_state_key(**self._state_settings())

    @property
    def tau_gen(self) -> int | None:
        """Step (optimizer steps) at which tau_gen was flagged, or None."""
        return None if self.detector.tau_gen is None else self.detector.tau_gen.step

    @property
    def tau_mem(self) -> int | None:
        """Step (optimizer steps) at which tau_mem was flagged, or None."""
        return None if self.detector.tau_mem is None else self.detector.tau_mem.step

    @property
    def num_generated(self) -> int:
        """Samples drawn per evaluation: the larger of f_mem's and FID's counts (images)."""
        fid_n = self.fid.num_samples if self.fid is not None and self.fid.num_samples else 0
        return max(self.num_samples, fid_n)

    @property
    def record_keys(self) -> list[str]:
        """Keys every history record holds a value for (FID only when it is on; user metrics by name)."""
        return listed_keys(fid=self.fid is not None, metrics=self.metrics)

    @property
    def training_classes(self) -> Tensor | None:
        """Class of every training image (int64, in data order, the same on every rank) of a class-conditional
        model, from ``setup``: ``train_labels`` or read beside the images; None before and for other models."""
        return self._train_labels

    @property
    def evaluator(self) -> Evaluator | None:
        """The :class:`~lightning_memwatch.Evaluator` (from ``on_fit_start``: on every rank when the index is
        sharded, else on global rank 0 and None elsewhere)."""
        return self._evaluator

    @property
    def index(self) -> KnnIndex | None:
        """The nearest-neighbour index of the training images (from ``on_fit_start``, where the evaluator is):
        a :class:`~lightning_memwatch.NearestNeighbourIndex`, or under DDP by default a
        :class:`~lightning_memwatch.metrics.knn_sharded.ShardedNearestNeighbourIndex` (its methods are
        collectives)."""
        return None if self._evaluator is None else self._evaluator.index

    @property
    def fid_evaluator(self) -> FIDEvaluator | None:
        """The FID evaluator (built at setup on every rank when FID is on), or None."""
        return self._fid_evaluator

    def copied_training_images(self, label: int | None = None) -> list[CopiedTrainingImage]:
        """The training images the samples copied so far (d1/d2 < threshold to them), most-copied first: training
        row, class (its training label when known), times copied, first and last step. Same on every rank,
        resumed with the checkpoint, written as CSV at the end of fit (see the Conditional models docs page).

        Args:
            label: only the training images of this class.
        """
        return self._copies.rows(label)

    def hparams(self) -> dict[str, Any]:
        """MemWatch's settings as hyperparameters: ``memwatch/<name>``, ``memwatch/detector_<name>`` and, with
        FID, ``memwatch/fid_<name>``; what was built (index backend, sharding, training images) once it is."""
        index = self.index
        values: dict[str, Any] = {
            "num_samples": self.num_samples,
            "sample_batch_size": self.sample_batch_size,
            "threshold": self.threshold,
            "schedule": repr(self.schedule),
            "seed": self.seed,
            "data_range": None if self.data_range is None else str(tuple(self.data_range)),
            "knn_backend": self.knn_backend if index is None else index.backend,
            # what was built: "sharded" (split across ranks) or "single" (one index); before that, the setting
            "knn_sharding": self.knn_sharding
            if index is None
            else ("sharded" if getattr(index, "world_size", 1) > 1 else "single"),
            "feature_fn": None if self.feature_fn is None else getattr(self.feature_fn, "__name__", "custom"),
            "num_train": None if index is None else index.num_train,
        }
        out = {f"{mwlog.PREFIX}{k}": v for k, v in values.items() if v is not None}
        out.update({f"{mwlog.PREFIX}detector_{k}": v for k, v in self.detector.config().items() if v is not None})
        if self._fid_evaluator is not None:
            out.update({f"{mwlog.PREFIX}fid_{k}": v for k, v in self._fid_evaluator.hparams().items()})
        return out

    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(trainer, pl_module, record)`` on every rank after each evaluation (detector updated, events
        emitted); ``record`` is the :class:`~lightning_memwatch.EvalRecord` just appended to the history."""
        if fn not in self._listeners:
            self._listeners.append(fn)

    def add_event_listener(self, fn: EventListener) -> None:
        """Call ``fn(trainer, pl_module, event)`` on every rank for each :class:`~lightning_memwatch.TimescaleEvent`
        the detector fires (tau_gen, tau_mem), right after the evaluation that fired it, before the record
        listeners."""
        if fn not in self._event_listeners:
            self._event_listeners.append(fn)

    # -- set-up ---------------------------------------------------------------------------------------
    def _sampler(self, pl_module: LightningModule) -> Callable[..., Tensor]:
        return sampler_of(pl_module, self.sample_fn)

    @staticmethod
    def _find_data_range(trainer: Trainer, pl_module: LightningModule) -> tuple[float, float]:
        value = data_range_of(trainer, pl_module)
        if value is None:
            raise _checks.config_error(
                "MemWatch(data_range=None) found no `data_range` on the datamodule or the module: pass "
                "`data_range=(low, high)`, the range of your training images and samples."
            )
        return _checks.check_data_range(value)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sampler(pl_module)  # fail early when there is no sampler
        self.scored_weights = resolve_weights(self.weights, trainer, pl_module)
        if self.data_range is None:
            self.data_range = self._find_data_range(trainer, pl_module)
        if self._train is None:  # read and checked once per watch (a collective under DDP); indexed in on_fit_start
            conditional = accepts_labels(self._sampler(pl_module))
            self._train = TrainImages.read(
                trainer,
                self.train_data,
                knn_sharding=self.knn_sharding,
                data_range=self.data_range,
                with_labels=conditional and self.train_labels is None,  # read beside the images, in one pass
            )
            self._setup_labels(trainer, pl_module)
            self._values = self._train.value_profile(trainer)  # where the values sit (value_check)
        if self.fid is not None and self._fid_evaluator is None:
            # built on every rank: a missing weights file fails everywhere, before training starts
            self._fid_evaluator = self._build_fid(trainer)

    def _setup_labels(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Class-conditional samplers: every training row's class (the same on every rank) and the class each
        generated sample asks for (:mod:`lightning_memwatch.labels`); errors at setup, on every rank."""
        assert self._train is not None
        if not accepts_labels(self._sampler(pl_module)):
            if self.labels is not None or self.train_labels is not None:
                raise _checks.config_error(
                    "MemWatch(labels=... / train_labels=...) is given, but the sampler takes no `labels`, so the "
                    "classes could never reach it: add a `labels=None` parameter (a LongTensor (B,) of class "
                    "indices) to `sample(...)` / `sample_fn(...)`, or drop these arguments."
                )
            return
        labels = train_labels_of(
            self._train.source, self.train_labels, sharded=self._train.sharded, rank=trainer.global_rank,
            world_size=trainer.world_size, broadcast=lambda obj, src: trainer.strategy.broadcast(obj, src=src),
            found=self._train.found_labels,
        )  # fmt: skip
        if labels is None:
            raise _checks.config_error(
                f"{type(pl_module).__name__}'s sampler takes `labels` (class-conditional), but the training data "
                "holds no labels: return (image, label) pairs from the training dataset, or pass "
                "`MemWatch(train_labels=<LongTensor, one class per training image>)`."
            )
        self._train_labels = labels
        self._sample_labels = sample_labels(self.labels, labels, self.num_generated, self.seed)

    def _build_fid(self, trainer: Trainer) -> FIDEvaluator:
        """The FID evaluator: against ``fid.reference``, else the datamodule's ``reference_images()``, else the
        training images (with FID's warning)."""
        assert self.fid is not None and self.data_range is not None and self._train is not None
        fid = self.fid
        if fid.reference is None and (reference := reference_images_of(trainer)) is not None:
            fid = dataclasses.replace(fid, reference=reference)
        evaluator = fid.build(
            data_range=self.data_range,
            device=trainer.strategy.root_device,
            fallback_reference=self._train.fid_fallback,
            num_samples=self.num_samples,
            state=self._pending_fid_state,  # held by the evaluator until its reference is prepared
        )
        self._pending_fid_state = None
        return evaluator

    def _build_evaluator(self, trainer: Trainer) -> Evaluator | None:
        """This rank's evaluator over its training rows (None where it holds none). FID and the user metrics go
        to rank 0's alone."""
        assert self._train is not None and self.data_range is not None
        train = self._train.index_input(trainer, backend=self.knn_backend, feature_fn=self.feature_fn)
        if train is None:
            return None
        main = trainer.is_global_zero
        return Evaluator(
            train,
            data_range=self.data_range,
            threshold=self.threshold,
            bootstrap=self.bootstrap,
            seed=self.seed,
            num_samples=self.num_samples,
            fid=self._fid_evaluator if main else None,
            metrics=self.metrics if main else None,
            feature_fn=self.feature_fn,
            knn_backend=self.knn_backend,  # type: ignore[arg-type]
            device=trainer.strategy.root_device,
            inputs_checked=True,  # checked at setup and at every evaluation on every rank
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The evaluator (and its index) is built here, not in setup: the module is on its device now, so a
        # feature_fn using its submodules (e.g. a VAE encoder) runs where its weights are. Once per fit, never
        # on the training step. Sharded: every rank builds its evaluator (the index is built collectively).
        if self._evaluator is None and self._train is not None:
            self._evaluator = self._build_evaluator(trainer)
        # MemWatch's settings join the hparams session Lightning logs right after this hook (one session)
        if trainer.is_global_zero:
            if self._fid_evaluator is not None and not trainer.strategy.restore_checkpoint_after_setup:
                self._fid_evaluator.prepare_reference()  # idempotent; its origin (cache hit/miss) goes in hparams
            self._hparams = HparamsSession(self.hparams, tensorboard_layout.hparams_metrics(self))
            self._hparams.join(trainer)
            tensorboard_layout.register(trainer, self)  # TensorBoard's CUSTOM SCALARS tab

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hparams is not None:  # loggers get their own log_hyperparams back, also after a failure
            self._hparams.release()
            self._hparams = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handed_back_step = None  # of this fit
        if self._fid_evaluator is not None and trainer.is_global_zero:
            self._fid_evaluator.prepare_reference()  # after load_state_dict: a resumed run reuses its stats
        if self._fid_evaluator is not None:
            self._set_train_floor(trainer)
        step = trainer.global_step
        self._cost = CostNote()  # of this fit
        self._cost.training_from(step)
        if trainer.is_global_zero:  # settings (when Lightning logged no hparams) and the setup summary
            if self._hparams is not None:
                self._hparams.flush()
            if self.verbose:
                rank_zero_info(self._setup_summary(trainer, step))
        if not self.history and (unreachable := self.schedule.unreachable_warning(step, trainer.max_steps)):
            rank_zero_warn(unreachable)
        if self._last_evaluated_step is not None:
            missed = self.schedule.between(self._last_evaluated_step, step)
            if missed:
                rank_zero_warn(
                    f"MemWatch resumed at step {step}: scheduled evaluations at steps {missed} lie between the "
                    f"last evaluation ({self._last_evaluated_step}) and the checkpoint; they are skipped, not re-run."
                )
        if step in self.schedule and step != self._last_evaluated_step:
            self._evaluate(trainer, pl_module, step, can_log=False)

    def _set_train_floor(self, trainer: Trainer) -> None:
        """FID of the training images against the reference, once per run (rank 0, broadcast), to the detector."""
        evaluator = self._fid_evaluator
        assert evaluator is not None
        if self.fid_train_floor is None and evaluator.reference_source != "train":
            value = None
            if self._evaluator is not None and self._train is not None:  # rank 0, or every rank when sharded
                fid_n = self.fid.num_samples or self.num_samples  # type: ignore[union-attr]
                first = self._train.first_images(self._evaluator, fid_n)  # as many as sampled; maybe a collective
                if trainer.is_global_zero:
                    value = evaluator.train_floor(first, num_samples=fid_n)  # the level of fid_n images
            value = trainer.strategy.broadcast(value, src=0)
            self.fid_train_floor = value
            if value is not None and trainer.is_global_zero:
                for lg in trainer.loggers:
                    lg.log_metrics({FID_TRAIN_FLOOR: value}, step=trainer.global_step)
                rank_zero_info(f"MemWatch: FID of the training images against the reference = {value:.4g}")
        if self.fid_train_floor is not None and self.detector.quality_key == "fid":
            self.detector.set_reference_floor(self.fid_train_floor)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_evaluated_step and step in self.schedule:
            self._evaluate(trainer, pl_module, step, can_log=True)

    # Lightning's WeightAveraging copies its average into the module when training ends, updated or not: a
    # never-updated average holds the initial weights, while MemWatch scored the raw weights. The raw weights go
    # into such an average before any on_train_end runs (the epoch's end comes first), so fit hands them back
    # (MemorizationEarlyStopping's restore then writes its kept weights into both).
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scored = self.scored_weights
        if scored is not None and fit_ends_with_this_epoch(trainer) and scored.hand_back(trainer, pl_module):
            self._handed_back_step = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        scored = self.scored_weights
        if scored is None or self._handed_back_step == trainer.global_step or scored.in_use(pl_module) != RAW_WARMUP:
            return
        averaging = find_weight_averaging(trainer)
        callbacks = list(trainer.callbacks)
        if averaging is None or self not in callbacks or callbacks.index(self) < callbacks.index(averaging):
            scored.hand_back(trainer, pl_module)  # its copy comes after this hook
            return
        rank_zero_warn(
            f"MemWatch: training ended at step {trainer.global_step}, without an epoch end, before "
            f"{scored.describe()} was ever updated ({scored.warmup_note()}): MemWatch scored the raw weights, but "
            "the averaging callback, placed before MemWatch, has copied its never-updated average, the initial "
            "weights, into the module. Place MemWatch before the averaging callback in the Trainer's callbacks, "
            "start the average earlier, or take the raw weights from a checkpoint."
        )

    def _setup_summary(self, trainer: Trainer, step: int) -> str:
        """The one line printed per fit (what was indexed, backend, FID reference, next evaluation)."""
        pending = step in self.schedule and step != self._last_evaluated_step
        next_step = step if pending else self.schedule.next_after(step)
        if next_step is not None and trainer.max_steps is not None and 0 <= trainer.max_steps < next_step:
            next_step = None
        last = self.history[-1] if self.history else None
        index = self.index
        return setup_summary(
            num_train=index.num_train if index is not None else 0,
            image_shape=self._train.image_shape if self._train is not None else (),
            backend=index.backend if index is not None else None,
            feature_dim=index.dim if index is not None and self.feature_fn is not None else None,
            fid=self._fid_evaluator.hparams() if self._fid_evaluator is not None else None,
            next_step=next_step,
            num_samples=self.num_generated,
            sample_batch_size=self.sample_batch_size,
            world_size=trainer.world_size,
            last_seconds=None if last is None else (last.sample_seconds or 0.0) + (last.metric_seconds or 0.0),
        )

    # -- one evaluation -------------------------------------------------------------------------------
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, step: int, *, can_log: bool) -> None:
        # the scored weights (raw, EMA or averaged), in eval mode, stay in the module until every listener has
        # seen them
        scored = self.scored_weights if self.scored_weights is not None else ScoredWeights()
        in_use = scored.in_use(pl_module)  # the raw weights while a chosen average was never updated
        self._cost.evaluating()
        with scoring(trainer, pl_module, self.scored_weights):
            record, copies = self._record_of(trainer, pl_module, step)
            self._record_copies(trainer, step, copies)
            record = self._annotate(record, in_use)
            self.history.append(record)
            self._last_evaluated_step = step
            events = self.detector.update(record)
            self.schedule.observe(record)  # an adaptive schedule plans its next step (every rank alike)
            self._publish(trainer, pl_module, record, events, can_log=can_log)
        if in_use == RAW_WARMUP or (len(self.history) > 1 and self.history[-2].scored_weights == RAW_WARMUP):
            self._say_warmup(trainer, scored, in_use, step)
        fix = (
            f"a sparser `schedule=` than {self.schedule!r} (e.g. 500, or an AdaptiveSchedule), or fewer "
            f"`num_samples=` than {self.num_samples}"
        )
        if (costly := self._cost.evaluated(step, fix)) and self.verbose:
            rank_zero_info(costly)

    def _say_warmup(self, trainer: Trainer, scored: ScoredWeights, in_use: str, step: int) -> None:
        """Say in the TensorBoard text (and once in the log) that the raw weights were scored, and when the
        average takes over."""
        if in_use == RAW_WARMUP:
            text = f"step {step}: {scored.warmup_note()}."
            if len(self.history) == 1 or self.history[-2].scored_weights != RAW_WARMUP:
                rank_zero_info(f"MemWatch: {text} The average is scored from its first update on.")
        else:
            text = f"step {step}: the {scored.describe()} are scored from here on (the average has been updated)."
            rank_zero_info(f"MemWatch: {text}")
        if trainer.is_global_zero:
            mwlog.log_text(trainer, mwlog.TIMESCALE_TEXT, text, step)

    def _say_first_forecast(self, trainer: Trainer, record: EvalRecord) -> None:
        """The warning before the copies: the first evaluation of the fit with an onset forecast says so once,
        in the log and the TensorBoard text (read from the history, so a resume does not repeat it)."""
        if record.onset_forecast is None or any(r.onset_forecast is not None for r in self.history[:-1]):
            return
        high = "open" if record.onset_forecast_high is None else f"{record.onset_forecast_high:.0f}"
        text = (
            f"step {record.step}: the samples are drifting toward the training images (ratio d1/d2 falling; f_mem "
            f"{record.f_mem:.3g}): copying forecast at step ~{record.onset_forecast:.0f} "
            f"[{record.onset_forecast_low:.0f}, {high}]"
        )
        rank_zero_info(f"MemWatch: {text}.")
        if trainer.is_global_zero:
            mwlog.log_text(trainer, mwlog.TIMESCALE_TEXT, f"**onset forecast** at {text}", record.step)

    def _annotate(self, record: EvalRecord, scored_weights: str) -> EvalRecord:
        """The record with what MemWatch knows beyond the samples: the weights scored and the onset forecast
        (:mod:`lightning_memwatch.onset`, from the history and this record: when f_mem will reach the level at
        which the detector's tau_mem rule holds, :func:`~lightning_memwatch.onset.detector_level`)."""
        level = detector_level(getattr(self.detector, "mem_rule", "ci"), getattr(self.detector, "f0", 0.0),
                               self.num_samples)  # fmt: skip
        forecast: OnsetForecast = forecast_onset([*self.history, record], threshold=self.threshold, level=level)
        return record.replace(
            scored_weights=scored_weights,
            onset_forecast=forecast.step,
            onset_forecast_low=forecast.low,
            onset_forecast_high=forecast.high,
        )

    def _record_of(
        self, trainer: Trainer, pl_module: LightningModule, step: int
    ) -> tuple[EvalRecord, list[tuple[int, int]]]:
        """Draw and gather the samples, check them, measure them (rank 0, or every rank when sharded) and
        broadcast rank 0's record and ``(sample, training row)`` copies, so every rank holds the same."""
        start = time.perf_counter()
        # progress of the evaluation inside the trainer's progress bar (silent without one)
        mine = len(rank_slice(self.num_generated, trainer.global_rank, trainer.world_size))
        with EvalProgress(trainer, mine, step) as progress:
            generated = self._generate(trainer, pl_module, progress)
            sample_seconds = time.perf_counter() - start
            assert self.data_range is not None
            # on every rank (each holds all the samples), so a raise never leaves the others waiting
            overshoot = check_sample_range(generated, f"MemWatch samples at step {step}", self.data_range)
            if overshoot is not None and not self._overshoot_warned:
                self._overshoot_warned = True
                rank_zero_warn(overshoot)
            if self._values is not None:  # where the values sit, not only their range (value_check)
                check_values(generated, self._values, f"MemWatch samples at step {step}")
            state = None
            self._last_nearest = None
            sharded = self._train is not None and self._train.sharded
            if trainer.is_global_zero or sharded:  # sharded: every rank searches its block
                progress.phase("nearest neighbours" + (" and FID" if self._fid_evaluator is not None else ""))
                record, copies = self._measure(trainer, generated, step, sample_seconds)
                state = (record.to_dict(), copies) if trainer.is_global_zero else None
        state, copies = trainer.strategy.broadcast(state, src=0)  # plain values across ranks
        return EvalRecord.from_dict(state), copies

    def _generate(
        self, trainer: Trainer, pl_module: LightningModule, progress: EvalProgress | None = None
    ) -> Tensor:
        """Draw this rank's share of the samples, then gather all of them (in index order) on every rank."""
        world, total = trainer.world_size, self.num_generated
        sampler = self._sampler(pl_module)
        shape = self._train.image_shape if self._train is not None else None
        failure: BaseException | None = None
        try:
            with torch.inference_mode():
                local = draw_samples(
                    sampler,
                    rank_slice(total, trainer.global_rank, world),
                    batch_size=self.sample_batch_size,
                    seed=self.seed,
                    device=trainer.strategy.root_device,
                    noise_shape=self.noise_shape or shape,
                    sample_shape=shape,
                    where="MemWatch.sample_fn" if self.sample_fn is not None else f"{type(pl_module).__name__}.sample",
                    on_batch=None if progress is None else progress.advance,  # progress bar
                    labels=self._sample_labels,  # class-conditional samplers only
                )
        except (TypeError, ValueError, AttributeError) as err:  # a bad sampler: every rank must learn of it
            failure = err
        if world > 1 and trainer.strategy.reduce_boolean_decision(failure is not None, all=False):
            if failure is None:  # another rank's sampler failed: stop here too rather than hang in all_gather
                raise RuntimeError("MemWatch: the sampler failed on another rank; see that rank's error.")
        if failure is not None:
            raise failure
        return gather_in_order(local, total, world, trainer.strategy.all_gather)

    def _measure(
        self, trainer: Trainer, generated: Tensor, step: int, sample_seconds: float
    ) -> tuple[EvalRecord, list[tuple[int, int]]]:
        """The evaluator's record of the gathered samples and their ``(sample, training row)`` copies, and the
        image panels to the loggers (rank 0). On rank 0, or on every rank when the index is sharded (its search
        and the training images by row are collectives, entered by every rank under the same conditions)."""
        evaluator, train = self._evaluator, self._train
        assert evaluator is not None and train is not None
        record = evaluator.evaluate(generated, step, sample_seconds=sample_seconds, labels=self._sample_labels)
        result = evaluator.last_result
        assert result is not None
        if self.log_images and trainer.loggers and train.can_show(evaluator):
            nearest = train.images_at(evaluator, result.nn_indices[:, 0])
            if trainer.is_global_zero:
                mwlog.log_images(
                    trainer, step, generated[: self.num_samples], result.ratios.float(), nearest, self.data_range,
                    threshold=self.threshold,
                )
                self._last_nearest = (generated[: self.num_samples], nearest, result.ratios)  # the copy strip
        return record, _copies.copied_rows(result)

    def _record_copies(self, trainer: Trainer, step: int, copies: list[tuple[int, int]]) -> None:
        """Add one evaluation's copies to the table (every rank, from rank 0's broadcast values), and log the
        table and the copy strip (rank 0)."""
        labels = self._train_labels
        rows = [row for _, row in copies]
        classes = None if labels is None else labels[torch.as_tensor(rows, dtype=torch.long)].tolist()
        asked = self._sample_labels  # the class each copying sample was generated for (class-conditional)
        generated = None if asked is None else asked[torch.as_tensor([s for s, _ in copies], dtype=torch.long)].tolist()
        self._copies.update(step, rows, classes, generated)
        if trainer.is_global_zero:
            shown = self._last_nearest or (None, None, None)
            assert self.data_range is not None
            _copies.log_copies(trainer, self._copies, step, copies, *shown, self.data_range, self.threshold)
        self._last_nearest = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = _copies.write_csv(trainer, self._copies)  # beside the checkpoints (rank 0, when any image was copied)
        if path is not None and self.verbose:
            rank_zero_info(f"MemWatch: {len(self._copies)} copied training image(s) listed in {path}")

    def _publish(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        record: EvalRecord,
        events: list[TimescaleEvent],
        *,
        can_log: bool,
    ) -> None:
        """The record's scalars (and the step of each event) to the loggers, the console line, then the event
        listeners and the record listeners (every rank)."""
        values = record.to_scalars()
        values.update({_event_key(e): float(e.step) for e in events})
        log_scalars(trainer, pl_module, values, record.step, can_log=can_log)
        if trainer.is_global_zero:  # the f0 line and the event steps of the CUSTOM SCALARS layout
            tensorboard_layout.log_guides(trainer, self, record.step)
        if self.verbose:
            rank_zero_info(f"{_describe(record)}{_copying_classes(record)}; {self.detector.status}")
        self._say_first_forecast(trainer, record)
        for event in events:
            whose = "" if event.label is None else f" for class {event.label}"
            rank_zero_info(f"MemWatch: {event.name} flagged{whose} at step {event.step}: {event.reason}")
            if trainer.is_global_zero:
                mwlog.log_text(
                    trainer, mwlog.TIMESCALE_TEXT, f"**{event.name}** at step {event.step}: {event.reason}", record.step
                )
            for event_listener in self._event_listeners:
                event_listener(trainer, pl_module, event)
        for listener in self._listeners:
            listener(trainer, pl_module, record)

    # -- state ----------------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Say by name what is not restored when the checkpoint holds no state for this watch's settings.

        Lightning restores a callback's state only under its ``state_key`` (``num_samples``, ``seed``,
        ``threshold``, and ``labels`` when given); otherwise it drops it with a generic warning. Here the watch
        says which settings differ and what starts afresh (its :class:`MemorizationEarlyStopping` then drops its
        kept weights too).
        """
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        found = _saved_states(states, type(self).__name__, self._state_settings())
        rank_zero_warn(
            f"MemWatch: the checkpoint holds {found}, so this watch restored nothing: not its history, the "
            "detector's tau_gen/tau_mem flags and rule state, the FID reference statistics, nor the train "
            f"floor. It starts a new history at step {trainer.global_step}. To continue the old history, resume "
            f"with the settings it was saved with."
        )

    def _state_settings(self) -> dict[str, Any]:
        settings: dict[str, Any] = {"num_samples": self.num_samples, "seed": self.seed, "threshold": self.threshold}
        if self.labels is not None:  # the default stays out, so checkpoints saved before `labels=` existed load
            settings["labels"] = labels_key(self.labels)
        if self.train_labels is not None:  # other training classes: another per-class history
            settings["train_labels"] = labels_key(self.train_labels)
        return settings

    def state_dict(self) -> dict[str, Any]:
        fid_state = (
            self._fid_evaluator.state_dict() if self._fid_evaluator is not None else self._pending_fid_state
        )
        return {
            "history": [r.to_dict() for r in self.history],  # plain dicts (EvalRecord.to_dict)
            "last_evaluated_step": self._last_evaluated_step,
            "detector": self.detector.state_dict(),
            "fid": fid_state,
            "fid_train_floor": self.fid_train_floor,
            "weights": getattr(self.scored_weights, "name", None),
            # adaptive schedules (lightning_memwatch.adaptive) carry their decisions; fixed schedules have none
            "schedule": self.schedule.state_dict() or None,
            "copies": self._copies.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # EvalRecord.from_dict also reads the flat dict records of checkpoints from earlier versions
        self.history = [EvalRecord.from_dict(r) for r in state_dict["history"]]
        self._last_evaluated_step = state_dict["last_evaluated_step"]
        self.detector.load_state_dict(state_dict["detector"])
        self.fid_train_floor = state_dict.get("fid_train_floor")
        if state_dict.get("schedule"):  # what an adaptive schedule decided (none for a fixed one)
            self.schedule.load_state_dict(state_dict["schedule"])
        self._copies = CopyTable()
        if state_dict.get("copies") is not None:  # absent from checkpoints saved before the copy table
            self._copies.load_state_dict(state_dict["copies"])
        fid_state = state_dict.get("fid")
        if fid_state is not None:
            if self._fid_evaluator is not None:
                self._fid_evaluator.load_state_dict(fid_state)
            else:
                self._pending_fid_state = fid_state


def _check_quality_key(quality: str, metrics: Mapping[str, Any]) -> None:
    """Refuse a detector quality key that no MemWatch record will hold (tau_gen could never fire)."""
    if quality == RecordField.FID or quality in metrics or quality in RECORD_FIELDS:
        return
    close = difflib.get_close_matches(quality, [*metrics, RecordField.FID], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise _checks.config_error(
        f"The detector's quality_key {quality!r} is not a key of MemWatch's records, so tau_gen could never "
        f"fire.{hint} Use 'fid' (with `fid=FID(...)`) or the name of one of `metrics` "
        f"({', '.join(map(repr, metrics)) or 'none given'})."
    )


def _check_weights(weights: Any) -> WeightsChoice:
    if not isinstance(weights, ModuleEMA) and weights not in WEIGHTS_NAMES:
        raise _checks.config_error(
            f"weights must be 'auto', 'raw', 'averaged' or ModuleEMA('attribute', target=...); got {weights!r}."
        )
    return weights


def _saved_states(states: Mapping[str, Any], name: str, mine: Mapping[str, Any]) -> str:
    """What a checkpoint's callback ``states`` hold of watches named ``name`` under other settings than ``mine``."""
    others = [k for k in states if isinstance(k, str) and k.startswith(name + "{")]
    if not others:
        return "no MemWatch state"
    parts = []
    for key in others:
        saved = _settings_of(key)
        keys = [*mine, *(k for k in saved if k not in mine)]  # `labels` is in a key only when given
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in keys if saved.get(k) != mine.get(k))
        n = len((states[key] or {}).get("history", []))
        parts.append(f"a MemWatch state of {n} evaluation(s) saved with other settings ({diff})")
    return "; ".join(parts)


def _settings_of(state_key: str) -> dict[str, Any]:
    """The settings dict of a ``Name{...}`` state key (empty when it cannot be read)."""
    import ast

    try:
        value = ast.literal_eval(state_key[state_key.index("{") :])
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def _event_key(event: TimescaleEvent) -> str:
    """The scalar logged when ``event`` fires: ``memwatch/tau_gen``, ``memwatch/tau_mem`` or, per class,
    ``memwatch/tau_mem/class_<k>``."""
    if event.name == "tau_gen":
        return mwlog.TAU_GEN
    return mwlog.TAU_MEM if event.label is None else f"{mwlog.TAU_MEM}/class_{event.label}"


def _copying_classes(record: EvalRecord) -> str:
    """``; copying classes: 3 (f_mem 0.45 of 100)`` for the classes with memorized samples ('' if none)."""
    copying = [
        f"{k} (f_mem {c.f_mem:.3f} of {c.num_samples})" for k, c in record.per_class.items() if c.f_mem > 0
    ]
    return f"; copying classes: {', '.join(copying)}" if copying else ""


def _describe(record: EvalRecord) -> str:
    text = (
        f"MemWatch step {record.step}: f_mem={record.f_mem:.4f} "
        f"[{record.f_mem_ci_low:.4f}, {record.f_mem_ci_high:.4f}] over {record.num_samples} samples, "
        f"median d1/d2={record.ratio_median:.3f}"
    )
    if record.fid is not None:
        text += f", FID={record.fid:.3f} ({record.fid_num_samples} samples)"
    if record.onset_forecast is not None:
        high = "open" if record.onset_forecast_high is None else f"{record.onset_forecast_high:.0f}"
        text += f", onset forecast ~{record.onset_forecast:.0f} [{record.onset_forecast_low:.0f}, {high}]"
    if record.scored_weights == RAW_WARMUP:
        text += ", raw weights (the average is not updated yet)"
    return text + f" (sampling {record.sample_seconds:.1f} s, metrics {record.metric_seconds:.2f} s)"

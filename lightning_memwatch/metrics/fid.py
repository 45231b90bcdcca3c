"""FID settings and evaluator: Fréchet distance between generated and reference images, with the reference
statistics computed once.

:class:`FID` holds the settings users pass as ``MemWatch(fid=FID(...))``; :meth:`FID.build` turns them into an
:class:`FIDEvaluator`, which owns the feature extractor and the reference statistics (computed, or taken from
a saved state or the disk cache). The maths (:func:`feature_statistics`, :class:`RunningMoments`,
:func:`matrix_sqrt_psd`, :func:`frechet_distance`) lives in :mod:`lightning_memwatch.metrics.frechet` and is
re-exported here; images are read by :mod:`lightning_memwatch.images`.

Why not torchmetrics' ``FrechetInceptionDistance`` metric object: its network is used (through
:mod:`lightning_memwatch.metrics.features`), but its metric states are not saved in checkpoints, cannot be
loaded from a disk cache keyed by content, and do not expose how many reference forward passes ran; here the
reference statistics live in :meth:`FIDEvaluator.state_dict` and in an atomic on-disk cache, and encoding runs
in batches on the evaluator's device.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_memwatch import _checks
from lightning_memwatch._checks import check_batch, check_choice, check_int, check_range
from lightning_memwatch.cache import RowSetFingerprint, TensorCache, default_cache_dir, make_key
from lightning_memwatch.images import ImageSource, iter_image_batches, num_images
from lightning_memwatch.metrics.features import (
    INCEPTION_FEATURE_LAYERS,
    RESIZE_MODES,
    FeatureExtractor,
    InceptionFeatureExtractor,
    InceptionWeightsNotFoundError,
    ModuleFeatureExtractor,
    ResizeMode,
    resolve_inception_weights,
)
from lightning_memwatch.metrics.frechet import (
    RunningMoments,
    feature_statistics,
    frechet_distance,
    matrix_sqrt_psd,
)

__all__ = [
    "FID",
    "FIDEvaluator",
    "RunningMoments",
    "feature_statistics",
    "frechet_distance",
    "matrix_sqrt_psd",
]

log = logging.getLogger(__name__)

CPU_INCEPTION_IMAGES_PER_SECOND = 8.0
"""Measured throughput of torch-fidelity's Inception on 2 CPU threads (32x32 images upscaled to 299)."""
CPU_WARN_IMAGES = 1000
"""Warn at build when Inception would encode more images than this per evaluation on CPU."""

_CACHE_SCHEMA = "memwatch-fid-reference-v1"
_STATE_VERSION = 1

@dataclass(eq=False)
class FID:
    """FID settings, passed as ``MemWatch(fid=FID(...))``; ``build()`` turns them into an
    :class:`FIDEvaluator`.

    Inception FID is a GPU feature: torch-fidelity's Inception encodes ~8 images/s on 2 CPU threads (32x32
    images upscaled to 299), i.e. ~20 min per evaluation of 10,000 samples; ``build()`` warns when that would
    happen.

    Attributes:
        reference: real images (tensor (N, C, H, W), Dataset or DataLoader; items may be ``(image, label)``)
            in the same ``data_range`` as the samples, read by :mod:`lightning_memwatch.images` (a DataLoader:
            the rows its sampler can draw, in dataset order). The paper uses held-out test images. ``None``: the
            training data, with a warning (train-FID rewards copying training images, i.e. memorization).
        feature_extractor: ``"inception"`` (torch-fidelity's Inception-v3, via torchmetrics) or any
            ``nn.Module`` mapping a batch of float images in ``data_range`` to (N, d) features (it must stay
            frozen).
        weights_path: local Inception weights file (torch-fidelity's
            ``weights-inception-2015-12-05-6726825d.pth``). ``None``:
            ``$LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS``, then torch hub's cache; else ``build()`` raises an
            error saying where to get the file. Never downloaded unless ``download=True``.
        num_samples: generated images per FID evaluation; ``None``: MemWatch's ``num_samples``. Below the
            feature dimension (2048 for Inception) the covariance is rank-deficient and FID biased upward
            (warned).
        batch_size: images per forward pass of the feature extractor (reference and generated).
        cache_dir: directory of the reference-statistics cache; ``None``:
            :func:`~lightning_memwatch.cache.default_cache_dir`.
        cache: set ``False`` to neither read nor write the disk cache (statistics still live in the callback
            state).
        resize: Inception resize to 299, pinned and logged: ``"bilinear-antialias"`` (torchmetrics >= 1.8
            default; identical to plain bilinear, i.e. pytorch-fid, when upsampling) or ``"tf1-bilinear"``
            (torch-fidelity's TensorFlow-1 compatible resize).
        feature_layer: Inception feature dimension, one of (64, 192, 768, 2048); 2048 (pool3) is the standard
            FID.
        download: allow downloading the Inception weights into torch hub's cache when they are not found
            locally.
    """

    reference: ImageSource | None = field(default=None, repr=False)
    feature_extractor: str | nn.Module = "inception"
    weights_path: str | os.PathLike[str] | None = None
    num_samples: int | None = None
    batch_size: int = 100
    cache_dir: str | os.PathLike[str] | None = None
    cache: bool = True
    resize: ResizeMode = "bilinear-antialias"
    feature_layer: int = 2048
    download: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.feature_extractor, str) and self.feature_extractor != "inception":
            raise _checks.config_error(
                f"feature_extractor must be 'inception' or a torch.nn.Module; got {self.feature_extractor!r}."
            )
        if not isinstance(self.feature_extractor, (str, nn.Module)):
            raise _checks.config_type_error(
                "feature_extractor must be 'inception' or a torch.nn.Module; got "
                f"{type(self.feature_extractor).__name__}."
            )
        if self.reference is not None and not isinstance(self.reference, (Tensor, Dataset, DataLoader)):
            raise _checks.config_type_error(
                "reference must be a tensor, Dataset or DataLoader of images (or None); got "
                f"{type(self.reference).__name__}."
            )
        self.batch_size = check_int(self.batch_size, "batch_size", minimum=1, unit="images per forward pass")
        if self.num_samples is not None:
            self.num_samples = check_int(self.num_samples, "num_samples", minimum=2, unit="images; or None")
        check_choice(self.resize, "resize", RESIZE_MODES)
        check_choice(self.feature_layer, "feature_layer", INCEPTION_FEATURE_LAYERS)

    def build(
        self,
        *,
        data_range: tuple[float, float],
        device: torch.device | str,
        fallback_reference: ImageSource | None = None,
        num_samples: int | None = None,
        state: Mapping[str, object] | None = None,
    ) -> FIDEvaluator:
        """Load the feature extractor and return an evaluator (the reference is encoded later, in
        :meth:`FIDEvaluator.prepare_reference`). Call it at setup, before training: a missing weights file
        fails here.

        Args:
            data_range: (low, high) range of generated and reference images.
            device: where features are computed (the LightningModule's device).
            fallback_reference: images used when ``reference`` is None (MemWatch passes the training data).
            num_samples: the caller's default sample count, used when ``self.num_samples`` is None.
            state: a :meth:`FIDEvaluator.state_dict` saved earlier (e.g. from a checkpoint), or None. The
                evaluator holds it until :meth:`FIDEvaluator.prepare_reference`, which takes its statistics
                (no forward pass) when they match the reference and settings, else recomputes with a warning.

        Raises:
            InceptionWeightsNotFoundError: Inception weights not available locally (message says how to fix
                it).
            ValueError: no reference images at all, or ``state`` is not an evaluator state.
        """
        reference, source = self.reference, "reference"
        if reference is None:
            if fallback_reference is None:
                raise _checks.config_error(
                    "FID needs reference images: pass FID(reference=<held-out real images>) (or training "
                    "data to MemWatch, which is then used with a warning)."
                )
            reference, source = fallback_reference, "train"
            warnings.warn(
                "FID(reference=None): measuring FID against the training data. Train-FID favours "
                "memorization (copies of training images score best), so it cannot reveal the quality loss "
                "that comes with copying; pass held-out images as FID(reference=...), as the paper does.",
                UserWarning,
                stacklevel=2,
            )
        device = torch.device(device)
        if isinstance(self.feature_extractor, nn.Module):
            extractor: FeatureExtractor = ModuleFeatureExtractor(self.feature_extractor, device=device)
        else:
            try:
                weights = resolve_inception_weights(self.weights_path, download=self.download)
            except InceptionWeightsNotFoundError as err:
                raise InceptionWeightsNotFoundError(
                    f"{err}\nOr use another feature space with FID(feature_extractor=<a torch.nn.Module mapping "
                    "images to feature vectors>), or turn FID off with MemWatch(fid=None) (then give "
                    "MemorizationEarlyStopping a quality metric, or strict=False)."
                ) from None
            extractor = InceptionFeatureExtractor(
                weights,
                data_range=data_range,
                resize=self.resize,
                feature_layer=self.feature_layer,
                device=device,
            )
        cache = None
        if self.cache:
            cache = TensorCache(
                Path(self.cache_dir) if self.cache_dir is not None else default_cache_dir(), "fid-ref"
            )
        evaluator = FIDEvaluator(
            extractor,
            reference,
            data_range=data_range,
            batch_size=self.batch_size,
            cache=cache,
            num_samples=self.num_samples if self.num_samples is not None else num_samples,
            reference_source=source,
            state=state,
        )
        evaluator.warn_about_cost()
        return evaluator


class FIDEvaluator:
    """FID of generated images against reference statistics computed once (or loaded from cache / checkpoint).

    Built by :meth:`FID.build`. Typical use (what MemWatch does)::

        evaluator = FID(reference=test_images).build(data_range=(-1, 1), device=device)   # setup
        evaluator.load_state_dict(saved)    # when resuming (optional; or FID.build(..., state=saved))
        evaluator.prepare_reference()       # on_train_start: cache/state hit -> no forward pass
        fid = evaluator.compute(samples)    # each evaluation

    Reference statistics have one pending stage, here: a state given before :meth:`prepare_reference` (to
    :meth:`load_state_dict` or as ``state=``) is held, returned by :meth:`state_dict` as it is (a checkpoint
    written before preparation keeps it), and adopted or refused by :meth:`prepare_reference`.

    Attributes:
        extractor: the feature extractor.
        num_samples: generated images per evaluation the caller should pass (None: whatever it passes).
        reference_source: ``"reference"`` or ``"train"`` (the fallback).
        num_reference_forward_passes: extractor calls made on reference images (0 after a cache/state hit).
        num_generated_forward_passes: extractor calls made on generated images.
        last_num_samples: rows of the last :meth:`compute` call (None before).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        reference: ImageSource,
        *,
        data_range: tuple[float, float] = (-1.0, 1.0),
        batch_size: int = 100,
        cache: TensorCache | None = None,
        num_samples: int | None = None,
        reference_source: str = "reference",
        state: Mapping[str, object] | None = None,
    ) -> None:
        if not isinstance(reference, (Tensor, Dataset, DataLoader)):
            raise _checks.config_type_error(
                f"reference must be a tensor, Dataset or DataLoader; got {type(reference).__name__}."
            )
        self.extractor = extractor
        self.reference = reference
        self.data_range = _checks.check_data_range(data_range)
        self.batch_size = check_int(batch_size, "batch_size", minimum=1, unit="images per forward pass")
        self.cache = cache
        self.num_samples = num_samples
        self.reference_source = reference_source
        self.num_reference_forward_passes = 0
        self.num_generated_forward_passes = 0
        self.last_num_samples: int | None = None
        self._reference_fingerprint: str | None = None
        self._num_reference: int | None = None
        self._key: str | None = None
        self._mean: Tensor | None = None
        self._cov: Tensor | None = None
        self._sqrt_cov: Tensor | None = None
        self._stats_origin: str | None = None  # "computed" | "cache" | "state"
        self._loaded: dict[str, object] | None = None
        self._warned_sets: set[str] = set()  # image sets already warned about ("generated", "train")
        self._warned_out_of_range = False
        if state is not None:
            self.load_state_dict(state)

    # ---- properties ----------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the feature extractor runs."""
        return self.extractor.device

    @property
    def num_features(self) -> int | None:
        """Feature dimension d (None for a custom module until its first forward pass)."""
        if self._mean is not None:
            return len(self._mean)
        return self.extractor.num_features

    @property
    def num_reference(self) -> int | None:
        """Reference images behind the statistics (None before :meth:`prepare_reference`)."""
        return self._num_reference

    @property
    def is_prepared(self) -> bool:
        """Whether reference statistics are available."""
        return self._mean is not None

    @property
    def reference_statistics(self) -> tuple[Tensor, Tensor]:
        """(mean (d,), covariance (d, d)), float64 on CPU. Raises if :meth:`prepare_reference` has not run."""
        if self._mean is None or self._cov is None:
            raise RuntimeError("reference statistics are not ready: call prepare_reference() first.")
        return self._mean, self._cov

    def to(self, device: torch.device | str) -> FIDEvaluator:
        """Move the feature extractor to ``device`` (e.g. once the Trainer placed the model); returns self."""
        self.extractor.to(device)
        return self

    # ---- setup-time checks ---------------------------------------------------------------------------------

    def warn_about_cost(self) -> None:
        """Warn when Inception would run on CPU over many images, or when FID would use fewer samples than the
        feature dimension. Called by :meth:`FID.build`."""
        d = self.extractor.num_features
        if self.num_samples is not None and d is not None and self.num_samples < d:
            warnings.warn(self._rank_message(self.num_samples, d, "generated"), UserWarning, stacklevel=3)
            self._warned_sets.add("generated")
        if not isinstance(self.extractor, InceptionFeatureExtractor) or self.device.type != "cpu":
            return
        per_eval = self.num_samples or 0
        num_ref = num_images(self.reference, "reference") or 0
        if per_eval > CPU_WARN_IMAGES or num_ref > CPU_WARN_IMAGES:
            rate = CPU_INCEPTION_IMAGES_PER_SECOND
            warnings.warn(
                f"Inception FID will run on CPU: torch-fidelity's Inception encodes ~{rate:.0f} images/s on "
                f"2 CPU threads, so {per_eval} generated images take ~{per_eval / rate / 60:.0f} min per "
                f"evaluation (plus ~{num_ref / rate / 60:.0f} min once for {num_ref} reference images, "
                "unless cached). Train on a GPU (features are computed on the module's device), lower "
                "FID(num_samples=...), or pass a small FID(feature_extractor=<nn.Module>).",
                UserWarning,
                stacklevel=3,
            )

    @staticmethod
    def _rank_message(n: int, d: int, which: str) -> str:
        if which == "train":  # the training set's own FID (the floor): all of it is used, nothing to raise
            return (
                f"The FID floor (the training images' own FID against the reference) uses {n} training images, "
                f"fewer than the feature dimension {d}: like any FID from so few images it is biased upward, so "
                "read the generated samples' FID against it, not against FIDs of larger sets."
            )
        if which == "generated":
            fix = f"Raise FID(num_samples=...) above {d} for a standard FID."
        else:
            fix = f"Pass more than {d} images as FID(reference=...) for a standard FID."
        return (
            f"FID from {n} {which} images, fewer than the feature dimension {d}: the {which} covariance is "
            "rank-deficient, so FID is biased upward and only comparable with FIDs from the same sample "
            f"counts (the paper uses 10,000 samples). {fix}"
        )

    # ---- reference -----------------------------------------------------------------------------------------

    def reference_fingerprint(self) -> str:
        """Order-independent content fingerprint of the reference images (computed once, in one pass)."""
        if self._reference_fingerprint is None:
            fp = RowSetFingerprint()
            for batch in iter_image_batches(self.reference, self.batch_size, "reference"):
                fp.update(batch)
            if fp.num_rows < 2:
                raise _checks.config_error(f"FID needs at least 2 reference images; got {fp.num_rows}.")
            self._reference_fingerprint, self._num_reference = fp.hexdigest(), fp.num_rows
        return self._reference_fingerprint

    def cache_key(self) -> str:
        """Hash of everything the reference statistics depend on: reference content, extractor identity
        (network, weights hash, preprocessing: data range, uint8 rounding, channels, resize), and the
        statistics format."""
        if self._key is None:
            fingerprint = self.reference_fingerprint()
            parts = {
                "schema": _CACHE_SCHEMA,
                "reference_sha256": fingerprint,
                "num_reference": self._num_reference,
                "extractor": self.extractor.identity(),
            }
            self._key = make_key(parts)
        return self._key

    def prepare_reference(self) -> None:
        """Make the reference statistics available; idempotent.

        Order: statistics already held -> a matching :meth:`load_state_dict` state -> the disk cache ->
        encoding the reference images in batches of ``batch_size`` on :attr:`device` (then writing the cache
        atomically). A state or cache entry is used only when its key equals :meth:`cache_key` (same images,
        extractor, preprocessing). Also computes the square root of the reference covariance used by every
        :meth:`compute` (~1-2 s on CPU for d = 2048).
        """
        if self._mean is not None:
            return
        self._resolve_statistics(self.cache_key())
        assert self._cov is not None
        self._sqrt_cov = matrix_sqrt_psd(self._cov)

    def _resolve_statistics(self, key: str) -> None:
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            if loaded["key"] == key:
                self._adopt(loaded["mean"], loaded["covariance"], "state")  # type: ignore[arg-type]
                self._save_to_cache(if_missing=True)
                return
            warnings.warn(
                "The FID reference statistics in the checkpoint were computed from other reference images "
                "or feature settings than the current ones; recomputing them.",
                UserWarning,
                stacklevel=3,
            )
        if self.cache is not None:
            entry = self.cache.load(key)
            tensors = entry["tensors"] if entry is not None else {}
            if isinstance(tensors.get("mean"), Tensor) and isinstance(tensors.get("covariance"), Tensor):
                self._adopt(tensors["mean"], tensors["covariance"], "cache")
                log.info("FID reference statistics loaded from %s", self.cache.path(key))
                return
        moments = RunningMoments()
        for batch in iter_image_batches(self.reference, self.batch_size, "reference"):
            moments.update(self._encode(batch, "reference"))
            self.num_reference_forward_passes += 1
        mean, cov = moments.statistics()
        self._adopt(mean, cov, "computed")
        d = len(mean)
        if moments.num_samples < d:
            warnings.warn(self._rank_message(moments.num_samples, d, "reference"), UserWarning, stacklevel=3)
        self._save_to_cache(if_missing=False)

    def _adopt(self, mean: Tensor, cov: Tensor, origin: str) -> None:
        self._mean = mean.detach().to("cpu", torch.float64)
        self._cov = cov.detach().to("cpu", torch.float64)
        self._sqrt_cov = None
        self._stats_origin = origin

    def _save_to_cache(self, *, if_missing: bool) -> None:
        if self.cache is None or self._mean is None or self._cov is None:
            return
        key = self.cache_key()
        if if_missing and self.cache.path(key).is_file():
            return
        try:
            path = self.cache.save(
                key,
                {"mean": self._mean, "covariance": self._cov},
                meta={"num_reference": self._num_reference, "extractor": self.extractor.identity()},
            )
            log.info("FID reference statistics cached at %s", path)
        except OSError as err:  # a read-only or full disk must not stop training
            warnings.warn(
                f"Could not write the FID reference cache ({err}); continuing without it.", stacklevel=3
            )

    def _encode(self, batch: Tensor, name: str) -> Tensor:
        batch = check_batch(batch, name)
        # Reference images must lie in data_range (a wrong scale would silently wreck every FID). Generated
        # samples may overshoot early in training (an untrained DDIM can be far off): the uint8 conversion
        # clamps them, as the paper's PNG export does; far off, a one-time warning says so (never an error
        # that would stop training; a wrong scale of the data itself is refused on the training images).
        if isinstance(self.extractor, InceptionFeatureExtractor):
            if name == "reference":
                check_range(batch, name, self.data_range)
            elif not self._warned_out_of_range:
                try:
                    check_range(batch, name, self.data_range, tolerance=1.0)
                except ValueError as err:
                    self._warned_out_of_range = True
                    warnings.warn(f"{err} They are clamped to data_range for FID.", stacklevel=3)
        return self.extractor.encode(batch)

    # ---- evaluation ----------------------------------------------------------------------------------------

    def train_floor(self, train: Tensor, num_samples: int | None = None) -> float:
        """FID of the training images against the reference: the level real data reaches with ``num_samples``
        images, a floor for the FID of that many generated samples. Not counted in
        :attr:`num_generated_forward_passes`.

        FID falls with the number of images it is computed on (its bias grows like 1 / N). With fewer training
        images ``n`` than ``num_samples`` (a small training set), the FID of the ``n`` images would overstate
        the level of ``num_samples`` real images; it is extrapolated instead from the FID of the ``n`` images
        and the mean FID of their two halves, with ``FID(N) = a + b / N`` (Chong & Forsyth 2020), to
        ``N = num_samples`` (never above the FID of the ``n`` images, never below 0), when each half holds at
        least as many images as the features have dimensions (else the FID of the ``n`` images). With ``n >=
        num_samples`` (or None) it is the FID of the first ``num_samples`` images.

        Args:
            train: training images (N >= 2) in ``data_range``.
            num_samples: generated samples the FID of each evaluation uses (images), or None.
        """
        n = len(train)
        if num_samples is None or n >= num_samples:
            return self.compute(train if num_samples is None else train[:num_samples], name="train")
        full = self.compute(train, name="train")
        half = n // 2
        self.prepare_reference()
        if half < max(4, len(self.reference_statistics[0])):
            # halves below the feature dimension have rank-deficient covariances, off the 1/N law: keep the FID
            # of all n images (biased upward, as the warning of compute says)
            return full
        halves = 0.5 * (self.compute(train[:half], name="train") + self.compute(train[half : 2 * half], name="train"))
        slope = (halves - full) / (1.0 / half - 1.0 / n)  # b in FID(N) = a + b / N
        at_num_samples = full + slope * (1.0 / num_samples - 1.0 / n)
        return float(min(max(at_num_samples, 0.0), full))

    def compute(self, generated: Tensor, *, name: str = "generated") -> float:
        """FID of ``generated`` (N >= 2 images in ``data_range``, any device) against the reference
        statistics.

        Encodes in batches of ``batch_size`` on :attr:`device`; prepares the reference first if needed. Warns
        once when N is below the feature dimension.
        """
        generated = check_batch(generated, name, min_rows=2)
        self.prepare_reference()
        mean_r, cov_r = self.reference_statistics
        moments = RunningMoments()
        for start in range(0, len(generated), self.batch_size):
            moments.update(self._encode(generated[start : start + self.batch_size], name))
            self.num_generated_forward_passes += name == "generated"
        mean_g, cov_g = moments.statistics()
        if mean_g.shape != mean_r.shape:
            raise _checks.config_error(f"generated features have dimension {len(mean_g)}, reference {len(mean_r)}.")
        n, d = len(generated), len(mean_r)
        which = "train" if name == "train" else "generated"
        if n < d and which not in self._warned_sets:
            warnings.warn(self._rank_message(n, d, which), UserWarning, stacklevel=2)
            self._warned_sets.add(which)
        if name == "generated":
            self.last_num_samples = n
        value = float(frechet_distance(mean_g, cov_g, mean_r, cov_r, sqrt_cov2=self._sqrt_cov))
        if not math.isfinite(value):  # pragma: no cover - inputs are checked finite
            raise FloatingPointError(
                "FID is not finite; check the generated images and the feature extractor."
            )
        return value

    # ---- reporting and state -------------------------------------------------------------------------------

    def hparams(self) -> dict[str, object]:
        """Settings worth logging with the run (str/int values; unknown ones omitted). Keys carry no prefix:
        MemWatch logs them as ``memwatch/fid_<key>`` (e.g. ``memwatch/fid_resize``)."""
        identity = self.extractor.identity()
        out: dict[str, object] = {
            "extractor": self.extractor.name,
            "reference": self.reference_source,
            "batch_size": self.batch_size,
        }
        optional = {
            "feature_dim": self.num_features,
            "num_samples": self.num_samples,
            "num_reference": self._num_reference,
            "resize": identity.get("resize"),
            "to_uint8": identity.get("to_uint8"),
            "channels": identity.get("channels"),
            "weights_sha256": identity.get("weights_sha256") or identity.get("state_sha256"),
            "cache_key": self._key,
            "reference_stats": self._stats_origin,
        }
        out.update({k: v for k, v in optional.items() if v is not None})
        return out

    @property
    def has_pending_state(self) -> bool:
        """Whether a loaded state waits for :meth:`prepare_reference` (given before preparation)."""
        return self._loaded is not None

    def state_dict(self) -> dict[str, object]:
        """Reference statistics and their key (float64 CPU tensors; 32 MB for d = 2048). Before
        :meth:`prepare_reference`: the state it holds from :meth:`load_state_dict` (or ``state=``), unchanged,
        else just the version."""
        if self._mean is None or self._cov is None or self._key is None:
            if self._loaded is not None:
                return {"version": _STATE_VERSION, **self._loaded}
            return {"version": _STATE_VERSION}
        return {
            "version": _STATE_VERSION,
            "key": self._key,
            "mean": self._mean.clone(),
            "covariance": self._cov.clone(),
            "num_reference": self._num_reference,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Hold the statistics of a :meth:`state_dict` for :meth:`prepare_reference`, which uses them (without
        any forward pass) if their key matches the current reference and settings, and recomputes with a
        warning if not. On a prepared evaluator, a state with the same key changes nothing and one with
        another key is ignored with a warning (the statistics held are those of the current reference)."""
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION:
            raise _checks.config_error(
                f"not an FIDEvaluator state (expected version {_STATE_VERSION}); got "
                f"{state.get('version') if isinstance(state, Mapping) else type(state).__name__}."
            )
        if "key" not in state:
            return
        for name in ("mean", "covariance"):
            if not isinstance(state.get(name), Tensor):
                raise _checks.config_error(f"FIDEvaluator state is missing the tensor {name!r}.")
        if self._mean is not None:
            if self._key != state["key"]:
                warnings.warn(
                    "FIDEvaluator.load_state_dict: the reference statistics are already prepared, and the state "
                    "given was computed from other reference images or feature settings; keeping the current "
                    "ones.",
                    UserWarning,
                    stacklevel=2,
                )
            return
        self._loaded = {
            "key": state["key"],
            "mean": state["mean"],
            "covariance": state["covariance"],
            "num_reference": state.get("num_reference"),
        }

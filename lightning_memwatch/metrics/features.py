"""Feature extractors for FID: torch-fidelity's Inception-v3 loaded offline, or any ``nn.Module``.

Both expose :class:`FeatureExtractor`: ``encode(images) -> (N, d)`` for one batch, on the extractor's device,
and an ``identity()`` mapping (JSON-able) that names everything the features depend on (cache keys and logged
hparams).

Inception preprocessing, fixed and recorded:

1. float images in ``data_range`` -> uint8 by **rounding half up** (``floor(v * 255 + 0.5)``, as
   ``torchvision.utils.save_image`` does before PNG files reach pytorch-fid), never by truncation;
2. grayscale (1 channel) replicated to 3 channels (like PIL's ``convert("RGB")``);
3. resize to 299x299 with a pinned mode (:data:`RESIZE_MODES`): ``"bilinear-antialias"`` (torch bilinear with
   antialias, torchmetrics' default since 1.8; for upsampling, e.g. 32 -> 299, it matches plain bilinear, i.e.
   pytorch-fid's resize, within 3e-4 grey levels) or ``"tf1-bilinear"`` (torch-fidelity's TensorFlow-1.x
   compatible resize, the original TF FID code's);
4. the network itself is torchmetrics' ``NoTrainInceptionV3`` (a subclass of torch-fidelity's
   ``FeatureExtractorInceptionV3``), pool3 (2048-d) features by default.

Weights are never downloaded implicitly (GPU nodes often have no internet, and a download attempt can hang):
they come from ``weights_path``, the ``LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS`` environment variable or torch
hub's cache, else :class:`InceptionWeightsNotFoundError` says which file to fetch and where to put it.
``download=True`` opts in to a download into torch hub's cache.

Pure torch: no Lightning import.
"""

from __future__ import annotations

import abc
import importlib.metadata
import os
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from lightning_memwatch._checks import (
    check_choice,
    check_data_range,
    check_float_tensor,
    config_error,
    config_type_error,
)
from lightning_memwatch.cache import fingerprint_file, fingerprint_module

__all__ = [
    "INCEPTION_FEATURE_LAYERS",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "RESIZE_MODES",
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "InceptionWeightsNotFoundError",
    "ModuleFeatureExtractor",
    "ResizeMode",
    "hub_inception_weights_path",
    "images_to_uint8",
    "resolve_inception_weights",
    "to_three_channels",
]

try:  # keep the URL in sync with the installed torch-fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as _TF_URL
except ImportError:  # pragma: no cover - torch-fidelity is a dependency
    _TF_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"

INCEPTION_WEIGHTS_ENV = "LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS"
"""Environment variable holding the path of a local Inception weights file (for offline machines)."""
INCEPTION_WEIGHTS_URL: str = _TF_URL
"""Where torch-fidelity downloads its Inception-v3 FID weights from (about 91 MB)."""
INCEPTION_WEIGHTS_FILENAME: str = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[-1]
"""File name of those weights, also their name in torch hub's cache."""
INCEPTION_FEATURE_LAYERS: tuple[int, ...] = (64, 192, 768, 2048)
"""Inception feature layers (feature dimensions) torch-fidelity provides; 2048 (pool3) is the standard FID."""

ResizeMode = Literal["bilinear-antialias", "tf1-bilinear"]
RESIZE_MODES: tuple[str, ...] = get_args(ResizeMode)

_INCEPTION_SIZE = 299


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - both are dependencies
        return "unknown"


class InceptionWeightsNotFoundError(FileNotFoundError):
    """The Inception weights file is not available locally; the message says how to provide it."""


def hub_inception_weights_path() -> Path:
    """Where torch hub keeps the downloaded weights: ``<torch.hub.get_dir()>/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def _missing_weights_message(problem: str) -> str:
    hub_path = hub_inception_weights_path()
    return (
        f"{problem}\n"
        "FID with feature_extractor='inception' needs torch-fidelity's Inception-v3 weights, and "
        "lightning_memwatch never downloads them implicitly (GPU nodes often have no internet). To fix it:\n"
        f"  1. on a machine with internet, fetch {INCEPTION_WEIGHTS_URL}\n"
        f"     (e.g. `wget {INCEPTION_WEIGHTS_URL}`, about 91 MB);\n"
        "  2. copy it to the training machine and point to it with either\n"
        "       FID(weights_path='/path/to/" + INCEPTION_WEIGHTS_FILENAME + "')  or\n"
        f"       export {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILENAME}\n"
        f"     or put it in torch hub's cache, where it is found automatically: {hub_path}\n"
        "On a machine with internet, FID(download=True) downloads it into that cache instead."
    )


def resolve_inception_weights(
    weights_path: str | os.PathLike[str] | None = None, *, download: bool = False
) -> Path:
    """Find the local Inception weights file, without touching the network unless ``download=True``.

    Looked up in this order: ``weights_path``; ``$LIGHTNING_MEMWATCH_INCEPTION_WEIGHTS``; torch hub's cache
    (:func:`hub_inception_weights_path`, where torchmetrics/torch-fidelity put it after an online run).

    Args:
        weights_path: explicit path; when given it must exist.
        download: when nothing is found locally, download :data:`INCEPTION_WEIGHTS_URL` into torch hub's
            cache.

    Returns:
        The path of an existing file.

    Raises:
        InceptionWeightsNotFoundError: the file is missing; the message names the URL, where to put the file
            and the ``weights_path`` setting / environment variable that point to it.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise InceptionWeightsNotFoundError(
                _missing_weights_message(f"FID(weights_path=...) {path} does not exist.")
            )
        return path
    from_env = os.environ.get(INCEPTION_WEIGHTS_ENV)
    if from_env:
        path = Path(from_env).expanduser()
        if not path.is_file():
            raise InceptionWeightsNotFoundError(
                _missing_weights_message(f"${INCEPTION_WEIGHTS_ENV} points to {path}, which does not exist.")
            )
        return path
    hub_path = hub_inception_weights_path()
    if hub_path.is_file():
        return hub_path
    if download:
        hub_path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(hub_path), progress=False)
        return hub_path
    raise InceptionWeightsNotFoundError(
        _missing_weights_message(
            f"No Inception weights file: FID(weights_path=None), ${INCEPTION_WEIGHTS_ENV} unset, and "
            f"{hub_path} absent."
        )
    )


def images_to_uint8(images: Tensor, data_range: tuple[float, float]) -> Tensor:
    """Map float images in ``data_range`` to uint8 [0, 255] by rounding half up; out-of-range values are
    clamped.

    ``v -> floor((v - lo) / (hi - lo) * 255 + 0.5)``, the conversion ``torchvision.utils.save_image`` applies
    before writing PNGs. (torchmetrics' ``normalize=True`` truncates instead, biasing every pixel down by half
    a grey level on average.) Returns a new tensor on the same device.

    Example:
        >>> images_to_uint8(torch.tensor([[-1.0, 0.0, 0.999, 1.0]]), (-1.0, 1.0))
        tensor([[  0, 128, 255, 255]], dtype=torch.uint8)
    """
    images = check_float_tensor(images, "images")
    lo, hi = check_data_range(data_range)
    scaled = (images.to(torch.float32) - lo) * (255.0 / (hi - lo))
    return torch.floor(scaled + 0.5).clamp_(0, 255).to(torch.uint8)


def to_three_channels(images: Tensor) -> Tensor:
    """Replicate a single (grayscale) channel to 3 channels; 3-channel images pass through unchanged.

    Raises:
        ValueError: for anything but (N, 1, H, W) or (N, 3, H, W).
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise config_error(
            "Inception features need images of shape (N, 1, H, W) or (N, 3, H, W); got "
            f"{tuple(images.shape)}. Convert other channel counts yourself, or pass "
            "FID(feature_extractor=<your nn.Module>) for vectors or other modalities."
        )
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FeatureExtractor(abc.ABC):
    """Maps one batch of images (float, in the user's data range) to an (N, d) feature matrix.

    Attributes:
        name: short human-readable name (logged).
        device: where the network runs and where :meth:`encode` returns its features.
    """

    name: str
    device: torch.device

    @property
    @abc.abstractmethod
    def num_features(self) -> int | None:
        """Feature dimension d, or ``None`` until the first :meth:`encode` when it cannot be known earlier."""

    @abc.abstractmethod
    def identity(self) -> dict[str, object]:
        """JSON-able description of everything the features depend on (network, weights, preprocessing)."""

    @abc.abstractmethod
    def _forward(self, images: Tensor) -> Tensor:
        """Run the network on ``images`` (already on :attr:`device`)."""

    @abc.abstractmethod
    def to(self, device: torch.device | str) -> FeatureExtractor:
        """Move the network to ``device`` and return ``self``."""

    def encode(self, images: Tensor) -> Tensor:
        """Features of one batch: (N, d) float, on :attr:`device`, computed without autograd.

        Args:
            images: (N, ...) float images in the data range; copied to :attr:`device`, never modified.
        """
        images = check_float_tensor(images, "images")
        with torch.inference_mode():
            out = self._forward(images.to(self.device))
        if not isinstance(out, Tensor) or out.ndim < 1 or len(out) != len(images):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise config_error(
                f"feature extractor {self.name} must map a batch of {len(images)} images to ({len(images)}, "
                f"d) features; got {got}."
            )
        return out.reshape(len(images), -1)


class InceptionFeatureExtractor(FeatureExtractor):
    """torch-fidelity's Inception-v3 (through torchmetrics' ``NoTrainInceptionV3``), loaded from a local file.

    Args:
        weights_path: an existing weights file (see :func:`resolve_inception_weights`).
        data_range: (low, high) of the float images passed to :meth:`encode`.
        resize: one of :data:`RESIZE_MODES`; pinned here and recorded in :meth:`identity`.
        feature_layer: one of :data:`INCEPTION_FEATURE_LAYERS` (2048 = pool3, the standard FID).
        device: where the network runs.

    Raises:
        ValueError: unknown ``resize`` or ``feature_layer``.
        RuntimeError: the file is not a torch-fidelity Inception state dict (names the file and the URL).
    """

    def __init__(
        self,
        weights_path: str | os.PathLike[str],
        *,
        data_range: tuple[float, float] = (-1.0, 1.0),
        resize: ResizeMode = "bilinear-antialias",
        feature_layer: int = 2048,
        device: torch.device | str = "cpu",
    ) -> None:
        check_choice(resize, "resize", RESIZE_MODES)
        check_choice(feature_layer, "feature_layer", INCEPTION_FEATURE_LAYERS)
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights_path = Path(weights_path)
        self.data_range = (float(data_range[0]), float(data_range[1]))
        self.resize: ResizeMode = resize
        self.feature_layer = int(feature_layer)
        self.name = f"inception-v3-compat/{feature_layer}"
        try:
            # An explicit path is always given, so this never reaches torch-fidelity's download branch.
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(feature_layer)],
                feature_extractor_weights_path=str(self.weights_path),
                antialias=(resize == "bilinear-antialias"),
            )
        except Exception as err:
            raise RuntimeError(
                f"Could not load Inception weights from {self.weights_path}: {err}\n"
                f"Expected torch-fidelity's state dict {INCEPTION_WEIGHTS_FILENAME} from "
                f"{INCEPTION_WEIGHTS_URL}."
            ) from err
        self.weights_sha256 = fingerprint_file(self.weights_path)
        self.device = torch.device(device)
        self.network.to(self.device)

    @property
    def num_features(self) -> int:
        return self.feature_layer

    def to(self, device: torch.device | str) -> InceptionFeatureExtractor:
        self.device = torch.device(device)
        self.network.to(self.device)
        return self

    def identity(self) -> dict[str, object]:
        return {
            "extractor": "torch-fidelity/inception-v3-compat",
            "feature_layer": self.feature_layer,
            "weights_sha256": self.weights_sha256,
            "data_range": list(self.data_range),
            "to_uint8": "round-half-up",
            "channels": "gray-replicated-to-rgb",
            "resize": self.resize,
            "input_size": _INCEPTION_SIZE,
            # their forward passes (resize, normalisation) may change between releases
            "torchmetrics": _version("torchmetrics"),
            "torch_fidelity": _version("torch-fidelity"),
        }

    def _forward(self, images: Tensor) -> Tensor:
        x = to_three_channels(images_to_uint8(images, self.data_range))
        return self.network(x.contiguous())


class ModuleFeatureExtractor(FeatureExtractor):
    """Any ``nn.Module`` mapping a batch of images (float, in the data range, unchanged) to (N, d) features.

    The module is moved to ``device`` (in place, as torchmetrics does with its feature networks) and run in
    eval mode under ``torch.inference_mode``; its train/eval mode is restored after each batch. It must stay
    frozen while used: its weights are fingerprinted once, here, for the cache key.

    Args:
        module: the feature network. An ``int`` attribute ``num_features`` is used as d when present.
        device: where it runs.
    """

    def __init__(self, module: nn.Module, *, device: torch.device | str = "cpu") -> None:
        if not isinstance(module, nn.Module):
            raise config_type_error(
                f"feature_extractor must be 'inception' or a torch.nn.Module; got {type(module).__name__}."
            )
        self.module = module
        cls = type(module)
        self.class_name = f"{cls.__module__}.{cls.__qualname__}"
        self.name = cls.__qualname__
        self.state_sha256 = fingerprint_module(module)
        self.device = torch.device(device)
        self.module.to(self.device)
        declared = getattr(module, "num_features", None)
        self._num_features: int | None = declared if isinstance(declared, int) else None

    @property
    def num_features(self) -> int | None:
        return self._num_features

    def to(self, device: torch.device | str) -> ModuleFeatureExtractor:
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def identity(self) -> dict[str, object]:
        return {"extractor": self.class_name, "state_sha256": self.state_sha256, "input": "float-data-range"}

    def _forward(self, images: Tensor) -> Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            out = self.module(images)
        finally:
            self.module.train(was_training)
        if isinstance(out, Tensor) and out.ndim >= 1 and len(out) == len(images):
            self._num_features = int(out[0].numel())
        return out

"""FID: preprocessing, the evaluator with a small extractor, the offline Inception path,
caching.

Everything runs on CPU without network. Inception tests use a randomly initialised torch-fidelity Inception
saved to a temporary file, and a handful of images (Inception at 299 px encodes ~5-8 images/s here).
"""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memwatch.metrics import features as features_module
from lightning_memwatch.metrics.features import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_FILENAME,
    INCEPTION_WEIGHTS_URL,
    InceptionWeightsNotFoundError,
    hub_inception_weights_path,
    images_to_uint8,
    to_three_channels,
)
from lightning_memwatch.metrics.fid import FID, FIDEvaluator

torch.set_num_threads(1)


# ---- helpers -----------------------------------------------------------------------------------------------


class ConvFeatures(nn.Module):
    """Small deterministic conv extractor: (N, 1, 8, 8) images -> (N, 12) features."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.proj = nn.Linear(6 * 4, 12)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        h = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return self.proj(h)


class OtherConvFeatures(ConvFeatures):
    pass


def _images(n: int, seed: int, size: int = 8) -> torch.Tensor:
    """Smooth-ish random images in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, size // 2, size // 2, generator=gen)
    up = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (up * 2 - 1).clamp(-1, 1)


def _build(reference: torch.Tensor, tmp_path: Path, **kwargs: object) -> FIDEvaluator:
    settings = {"feature_extractor": ConvFeatures(), "batch_size": 16, "cache_dir": tmp_path / "cache"}
    settings.update(kwargs)
    return FID(reference=reference, **settings).build(data_range=(-1.0, 1.0), device="cpu")  # type: ignore[arg-type]


# ---- preprocessing -----------------------------------------------------------------------------------------


def test_uint8_conversion_rounds_instead_of_truncating() -> None:
    unit = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 0.999, 1.0, 1.2, -0.1])
    before = unit.clone()
    assert images_to_uint8(unit, (0.0, 1.0)).tolist() == [0, 0, 1, 255, 255, 255, 255, 0]
    assert torch.equal(unit, before)
    # truncation (torchmetrics' normalize=True) would give 254 for 254.6/255
    assert int((unit[3] * 255).byte()) == 254
    signed = torch.tensor([-1.0, 0.0, 1.0, 2 * 100.5 / 255 - 1])  # 127.5 and 100.5 grey levels round half up
    assert images_to_uint8(signed, (-1.0, 1.0)).tolist() == [0, 128, 255, 101]
    assert images_to_uint8(unit.half(), (0.0, 1.0))[3] == 255


def test_uint8_conversion_matches_torchvision_save_image() -> None:
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    save_image_bytes = x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)  # torchvision.utils.save_image
    assert torch.equal(images_to_uint8(x, (0.0, 1.0)), save_image_bytes)
    assert torch.equal(images_to_uint8(x * 2 - 1, (-1.0, 1.0)), save_image_bytes)
    with pytest.raises(ValueError, match="high > low"):
        images_to_uint8(x, (1.0, 1.0))
    with pytest.raises(TypeError, match="floating-point"):
        images_to_uint8(save_image_bytes, (0.0, 1.0))


def test_gray_images_get_three_channels() -> None:
    gray = torch.randint(0, 255, (2, 1, 4, 4), dtype=torch.uint8)
    rgb = to_three_channels(gray)
    assert rgb.shape == (2, 3, 4, 4)
    assert all(torch.equal(rgb[:, c], gray[:, 0]) for c in range(3))
    colour = torch.zeros(2, 3, 4, 4)
    assert to_three_channels(colour) is colour
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) or \(N, 3, H, W\)"):
        to_three_channels(torch.zeros(2, 2, 4, 4))


# ---- evaluator with a small conv extractor -----------------------------------------------------------------


def test_fid_of_reference_against_itself_is_zero(tmp_path: Path) -> None:
    reference = _images(120, seed=0)
    evaluator = _build(reference, tmp_path)
    assert evaluator.compute(reference) == pytest.approx(0.0, abs=1e-9)
    assert evaluator.compute(_images(120, seed=1)) > 1e-4  # an independent draw is not exactly 0


def test_fid_does_not_depend_on_batch_size(tmp_path: Path) -> None:
    reference, generated = _images(100, seed=0), _images(90, seed=1)
    values = [
        _build(reference, tmp_path / str(bs), batch_size=bs, cache=False).compute(generated)
        for bs in (7, 64, 500)
    ]
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert values[0] == pytest.approx(values[2], rel=1e-6)


def test_fid_grows_as_generated_drifts_from_reference(tmp_path: Path) -> None:
    reference, fresh = _images(150, seed=0), _images(150, seed=1)
    evaluator = _build(reference, tmp_path)
    direction = _images(1, seed=9)[0]
    fids = [
        evaluator.compute((fresh + level * direction).clamp(-1, 1)) for level in (0.0, 0.1, 0.3, 0.6, 1.0)
    ]
    assert all(a < b for a, b in zip(fids[:-1], fids[1:], strict=True)), fids
    assert fids[-1] > 10 * fids[0]


def test_forward_passes_are_counted_and_batched(tmp_path: Path) -> None:
    evaluator = _build(_images(50, seed=0), tmp_path, batch_size=16)
    evaluator.prepare_reference()
    evaluator.prepare_reference()  # idempotent
    assert evaluator.num_reference_forward_passes == 4  # ceil(50 / 16)
    evaluator.compute(_images(33, seed=1))
    assert evaluator.num_generated_forward_passes == 3
    assert evaluator.last_num_samples == 33
    assert evaluator.num_reference_forward_passes == 4


def test_user_module_mode_and_inputs_are_preserved(tmp_path: Path) -> None:
    module = ConvFeatures().train()
    reference, generated = _images(40, seed=0), _images(40, seed=1)
    ref_copy, gen_copy = reference.clone(), generated.clone()
    evaluator = _build(reference, tmp_path, feature_extractor=module)
    evaluator.compute(generated)
    assert module.training
    assert torch.equal(reference, ref_copy) and torch.equal(generated, gen_copy)


def test_dataset_and_dataloader_references_match_the_tensor(tmp_path: Path) -> None:
    reference, generated = _images(60, seed=0), _images(60, seed=1)
    labels = torch.arange(60)
    by_tensor = _build(reference, tmp_path, cache=False)
    by_dataset = _build(TensorDataset(reference, labels), tmp_path, cache=False)
    shuffled = DataLoader(TensorDataset(reference, labels), batch_size=25, shuffle=True)
    by_loader = _build(shuffled, tmp_path, cache=False)
    expected = by_tensor.compute(generated)
    assert by_dataset.compute(generated) == pytest.approx(expected, rel=1e-9)
    assert by_loader.compute(generated) == pytest.approx(expected, rel=1e-9)
    assert by_tensor.cache_key() == by_dataset.cache_key() == by_loader.cache_key()
    assert by_loader.num_reference_forward_passes == 4  # loader batches of 25 re-cut to 16, 16, 16, 12


def test_training_data_fallback_warns_and_missing_reference_fails(tmp_path: Path) -> None:
    train = _images(40, seed=0)
    settings = FID(feature_extractor=ConvFeatures(), cache=False)
    with pytest.warns(UserWarning, match="favours memorization"):
        evaluator = settings.build(data_range=(-1.0, 1.0), device="cpu", fallback_reference=train)
    assert evaluator.reference_source == "train"
    assert evaluator.compute(train) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="FID needs reference images"):
        settings.build(data_range=(-1.0, 1.0), device="cpu")


def test_sample_count_below_feature_dimension_warns(tmp_path: Path) -> None:
    class Declared(ConvFeatures):
        num_features = 12

    with pytest.warns(UserWarning, match="rank-deficient"):
        evaluator = _build(_images(40, seed=0), tmp_path, feature_extractor=Declared(), num_samples=8)
    assert evaluator.num_samples == 8
    evaluator = _build(_images(40, seed=0), tmp_path, num_samples=8)  # d unknown until the first forward pass
    with pytest.warns(UserWarning, match="FID from 8 generated images, fewer than the feature dimension 12"):
        value = evaluator.compute(_images(8, seed=1))
    assert math.isfinite(value)



def test_train_floor_warning_names_the_training_set(tmp_path: Path) -> None:
    """The training set's own FID (the floor) from few images warns about the training images, with nothing to
    raise (all of them are used), and leaves the generated samples' own warning to come."""
    import warnings

    evaluator = _build(_images(40, seed=0), tmp_path, num_samples=40)  # 12 features: 40 samples are enough
    with pytest.warns(UserWarning, match="The FID floor .* uses 8 training images") as caught:
        evaluator.train_floor(_images(8, seed=2))
    assert not any("num_samples" in str(w.message) or "generated images" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="FID from 8 generated images"):  # its own warning, once
        evaluator.compute(_images(8, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluator.compute(_images(8, seed=3))


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="'inception' or a torch.nn.Module"):
        FID(feature_extractor="vgg")
    with pytest.raises(ValueError, match="resize must be one of"):
        FID(resize="nearest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="feature_layer must be one of"):
        FID(feature_layer=1000)
    with pytest.raises(ValueError, match="batch_size"):
        FID(batch_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        FID(num_samples=1)
    with pytest.raises(TypeError, match="reference must be"):
        FID(reference=[1, 2, 3])  # type: ignore[arg-type]


def test_bad_generated_input_is_refused(tmp_path: Path) -> None:
    evaluator = _build(_images(20, seed=0), tmp_path)
    with pytest.raises(ValueError, match="at least 2 rows"):
        evaluator.compute(_images(1, seed=1))
    bad = _images(4, seed=1)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        evaluator.compute(bad)
    with pytest.raises(TypeError, match="floating-point"):
        evaluator.compute(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))


# ---- caching and resuming ----------------------------------------------------------------------------------


def test_second_run_loads_reference_statistics_from_disk(tmp_path: Path) -> None:
    reference, generated = _images(64, seed=0), _images(64, seed=1)
    first = _build(reference, tmp_path)
    fid_first = first.compute(generated)
    assert first.num_reference_forward_passes == 4
    assert first.hparams()["reference_stats"] == "computed"
    cached = list((tmp_path / "cache").glob("fid-ref-*.pt"))
    assert [p.name for p in cached] == [f"fid-ref-{first.cache_key()}.pt"]

    second = _build(reference.clone(), tmp_path)  # new evaluator, same settings and images
    second.prepare_reference()
    assert second.num_reference_forward_passes == 0
    assert second.hparams()["reference_stats"] == "cache"
    assert second.compute(generated) == pytest.approx(fid_first, rel=1e-12)
    assert torch.equal(second.reference_statistics[1], first.reference_statistics[1])


def test_resumed_evaluator_uses_its_state_dict(tmp_path: Path) -> None:
    reference, generated = _images(64, seed=0), _images(64, seed=1)
    first = _build(reference, tmp_path, cache=False)
    fid_first = first.compute(generated)
    state = first.state_dict()
    assert state["mean"].dtype == torch.float64 and state["covariance"].shape == (12, 12)

    resumed = _build(reference, tmp_path, cache=False)
    resumed.load_state_dict(state)
    resumed.prepare_reference()
    assert resumed.num_reference_forward_passes == 0
    assert resumed.hparams()["reference_stats"] == "state"
    assert resumed.compute(generated) == pytest.approx(fid_first, rel=1e-12)
    assert resumed.state_dict()["key"] == state["key"]

    fresh = _build(reference, tmp_path, cache=False)
    assert fresh.state_dict() == {"version": 1}
    fresh.load_state_dict(fresh.state_dict())  # an unprepared state round-trips
    with pytest.raises(ValueError, match="not an FIDEvaluator state"):
        fresh.load_state_dict({"history": []})


def test_state_given_before_preparation_is_held_once_inside_the_evaluator(tmp_path: Path) -> None:
    reference, generated = _images(64, seed=0), _images(64, seed=1)
    first = _build(reference, tmp_path, cache=False)
    fid_first = first.compute(generated)
    state = first.state_dict()

    settings = FID(reference=reference, feature_extractor=ConvFeatures(), batch_size=16, cache=False)
    built = settings.build(data_range=(-1.0, 1.0), device="cpu", state=state)
    assert built.has_pending_state and not built.is_prepared
    held = built.state_dict()  # a checkpoint written before preparation keeps the statistics
    assert held["key"] == state["key"] and torch.equal(held["covariance"], state["covariance"])
    again = _build(reference, tmp_path, cache=False)
    again.load_state_dict(held)  # and they load back
    for evaluator in (built, again):
        evaluator.prepare_reference()
        assert not evaluator.has_pending_state
        assert evaluator.num_reference_forward_passes == 0 and evaluator.hparams()["reference_stats"] == "state"
        assert evaluator.compute(generated) == pytest.approx(fid_first, rel=1e-12)


def test_state_loaded_into_a_prepared_evaluator(tmp_path: Path) -> None:
    reference = _images(32, seed=0)
    prepared = _build(reference, tmp_path, cache=False)
    prepared.prepare_reference()
    mean = prepared.reference_statistics[0].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared.load_state_dict(prepared.state_dict())  # the same statistics: nothing to say, nothing held
    assert not prepared.has_pending_state
    other = _build(_images(32, seed=5), tmp_path, cache=False)
    other.prepare_reference()
    with pytest.warns(UserWarning, match="keeping the current ones"):
        prepared.load_state_dict(other.state_dict())
    assert not prepared.has_pending_state and torch.equal(prepared.reference_statistics[0], mean)


def test_state_from_other_reference_is_recomputed_with_warning(tmp_path: Path) -> None:
    first = _build(_images(32, seed=0), tmp_path, cache=False)
    first.prepare_reference()
    other = _build(_images(32, seed=5), tmp_path, cache=False)
    other.load_state_dict(first.state_dict())
    with pytest.warns(UserWarning, match="recomputing"):
        other.prepare_reference()
    assert other.num_reference_forward_passes == 2
    assert not torch.equal(other.reference_statistics[0], first.reference_statistics[0])


def test_cache_key_names_reference_content_and_extractor(tmp_path: Path) -> None:
    reference = _images(32, seed=0)
    key = _build(reference, tmp_path).cache_key()
    assert _build(reference[torch.randperm(32)], tmp_path).cache_key() == key  # order does not matter
    one_changed = reference.clone()
    one_changed[17, 0, 3, 3] += 0.01
    assert _build(one_changed, tmp_path).cache_key() != key
    assert _build(reference[:-1], tmp_path).cache_key() != key
    assert _build(reference, tmp_path, feature_extractor=ConvFeatures(seed=1)).cache_key() != key
    assert _build(reference, tmp_path, feature_extractor=OtherConvFeatures()).cache_key() != key
    # a changed reference really misses the cache
    evaluator = _build(one_changed, tmp_path)
    _build(reference, tmp_path).prepare_reference()
    evaluator.prepare_reference()
    assert evaluator.num_reference_forward_passes == 2


def test_corrupt_cache_entry_is_recomputed(tmp_path: Path) -> None:
    reference = _images(32, seed=0)
    first = _build(reference, tmp_path)
    first.prepare_reference()
    path = tmp_path / "cache" / f"fid-ref-{first.cache_key()}.pt"
    path.write_bytes(b"truncated")
    second = _build(reference, tmp_path)
    with pytest.warns(UserWarning, match="unreadable cache entry"):
        second.prepare_reference()
    assert second.num_reference_forward_passes == 2
    third = _build(reference, tmp_path)  # the entry was rewritten
    third.prepare_reference()
    assert third.num_reference_forward_passes == 0


def test_unwritable_cache_only_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    evaluator = _build(_images(32, seed=0), tmp_path, cache_dir=blocker)
    with pytest.warns(UserWarning, match="Could not write the FID reference cache"):
        value = evaluator.compute(_images(32, seed=1))
    assert math.isfinite(value) and evaluator.num_reference_forward_passes == 2


# ---- Inception, offline ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised torch-fidelity Inception state dict, saved like the real weights file."""
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with pytest.MonkeyPatch.context() as mp:  # build the network without loading (or downloading) weights
        mp.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(cls, "load_state_dict", lambda self, state, strict=True: None)
        torch.manual_seed(0)
        network = cls("inception-v3-compat", ["2048"])
    for module in network.modules():  # He init keeps activations O(1) through the 94 conv layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network: every download entry point raises; torch hub points to an empty dir; env var unset."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("attempted a download")

    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", no_network)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path


def _gray32(n: int, seed: int) -> torch.Tensor:
    return _images(n, seed=seed, size=32)


def test_inception_from_weights_path_gives_finite_fid(inception_weights: Path, offline: Path) -> None:
    reference, generated = _gray32(4, seed=0), _gray32(4, seed=1)
    settings = FID(reference=reference, weights_path=inception_weights, batch_size=3, cache_dir=offline / "c")
    with pytest.warns(UserWarning, match="FID from 4 generated images"):
        evaluator = settings.build(data_range=(-1.0, 1.0), device="cpu", num_samples=4)
    with pytest.warns(UserWarning, match="fewer than the feature dimension 2048"):
        evaluator.prepare_reference()
    assert evaluator.num_reference_forward_passes == 2
    mean, cov = evaluator.reference_statistics
    assert mean.shape == (2048,) and cov.shape == (2048, 2048) and cov.dtype == torch.float64
    value = evaluator.compute(generated)
    assert math.isfinite(value) and value > 0
    hparams = evaluator.hparams()
    assert hparams["extractor"] == "inception-v3-compat/2048"
    assert hparams["resize"] == "bilinear-antialias"
    assert hparams["to_uint8"] == "round-half-up"
    assert hparams["feature_dim"] == 2048 and hparams["num_samples"] == 4


@pytest.mark.filterwarnings("ignore:FID from")
def test_inception_identity_and_zero_self_distance(
    inception_weights: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        INCEPTION_WEIGHTS_ENV, str(inception_weights)
    )  # found through the environment variable
    reference = _gray32(4, seed=0)

    def build(**kwargs: object) -> FIDEvaluator:
        settings = {"reference": reference, "feature_layer": 64, "cache": False, **kwargs}
        data_range = settings.pop("data_range", (-1.0, 1.0))
        return FID(**settings).build(data_range=data_range, device="cpu")  # type: ignore[arg-type]

    evaluator = build()
    assert evaluator.compute(reference) == pytest.approx(0.0, abs=1e-6)
    assert evaluator.compute(_gray32(4, seed=1)) > 0
    identity = evaluator.extractor.identity()
    assert identity["weights_sha256"] == features_module.fingerprint_file(inception_weights)
    key = evaluator.cache_key()
    assert build(resize="tf1-bilinear").cache_key() != key
    assert build(data_range=(-1.0, 1.5)).cache_key() != key
    assert build(feature_layer=192).cache_key() != key
    assert build().cache_key() == key


def test_inception_found_in_torch_hub_cache(inception_weights: Path, offline: Path) -> None:
    hub_file = hub_inception_weights_path()
    assert str(hub_file).startswith(str(offline))
    hub_file.parent.mkdir(parents=True)
    shutil.copyfile(inception_weights, hub_file)
    evaluator = FID(reference=_gray32(3, 0), feature_layer=64, cache=False).build(
        data_range=(-1, 1), device="cpu"
    )
    assert evaluator.extractor.weights_path == hub_file  # type: ignore[attr-defined]


def test_missing_weights_fail_at_build_with_instructions(offline: Path) -> None:
    settings = FID(reference=_gray32(3, 0), cache=False)
    with pytest.raises(InceptionWeightsNotFoundError) as info:
        settings.build(data_range=(-1.0, 1.0), device="cpu")
    message = str(info.value)
    for needle in (
        INCEPTION_WEIGHTS_URL,
        INCEPTION_WEIGHTS_FILENAME,
        INCEPTION_WEIGHTS_ENV,
        "weights_path",
        str(hub_inception_weights_path()),
    ):
        assert needle in message
    assert INCEPTION_WEIGHTS_FILENAME == "weights-inception-2015-12-05-6726825d.pth"
    with pytest.raises(InceptionWeightsNotFoundError, match="does not exist"):
        FID(reference=_gray32(3, 0), weights_path=offline / "nope.pth").build(
            data_range=(-1, 1), device="cpu"
        )


def test_env_var_pointing_nowhere_fails(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(offline / "missing.pth"))
    with pytest.raises(InceptionWeightsNotFoundError, match=INCEPTION_WEIGHTS_ENV):
        FID(reference=_gray32(3, 0)).build(data_range=(-1, 1), device="cpu")


def test_download_only_when_asked(
    inception_weights: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str]] = []

    def fake_download(url: str, dst: str, **kwargs: object) -> None:
        calls.append((url, dst))
        shutil.copyfile(inception_weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(InceptionWeightsNotFoundError):
        FID(reference=_gray32(3, 0), feature_layer=64).build(data_range=(-1, 1), device="cpu")
    assert calls == []
    FID(reference=_gray32(3, 0), feature_layer=64, download=True, cache=False).build(
        data_range=(-1, 1), device="cpu"
    )
    assert calls == [(INCEPTION_WEIGHTS_URL, str(hub_inception_weights_path()))]


def test_wrong_weights_file_is_named(offline: Path) -> None:
    bogus = offline / "bogus.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bogus)
    with pytest.raises(RuntimeError, match="Could not load Inception weights from .*bogus.pth"):
        FID(reference=_gray32(3, 0), weights_path=bogus).build(data_range=(-1, 1), device="cpu")


def test_inception_on_cpu_with_many_samples_warns(inception_weights: Path, offline: Path) -> None:
    settings = FID(reference=_gray32(3, 0), weights_path=inception_weights, feature_layer=64, cache=False)
    with pytest.warns(
        UserWarning, match=r"Inception FID will run on CPU: .*~8 images/s.* 2000 generated images"
    ):
        settings.build(data_range=(-1.0, 1.0), device="cpu", num_samples=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings.build(data_range=(-1.0, 1.0), device="cpu", num_samples=64)


@pytest.mark.filterwarnings("ignore:FID from")
def test_inception_refuses_out_of_range_reference_and_clamps_generated(inception_weights: Path, offline: Path) -> None:
    evaluator = FID(
        reference=_gray32(3, 0) * 127.5 + 127.5, weights_path=inception_weights, feature_layer=64, cache=False
    ).build(data_range=(-1.0, 1.0), device="cpu")
    with pytest.raises(ValueError, match="data_range"):
        evaluator.prepare_reference()
    evaluator = FID(
        reference=_gray32(3, 0), weights_path=inception_weights, feature_layer=64, cache=False
    ).build(data_range=(-1.0, 1.0), device="cpu")
    far_off = _gray32(3, 1) * 100  # an untrained sampler overshooting: training must go on
    with pytest.warns(UserWarning, match="clamped to data_range"):
        value = evaluator.compute(far_off)
    assert value == pytest.approx(evaluator.compute(far_off.clamp(-1, 1)), rel=1e-6)


def test_train_floor_of_a_small_training_set_is_the_level_of_num_samples_real_images():
    """n = 40 training images, FID on 1000 samples: the FID of the 40 images (the old floor) overstates the
    level 1000 real images reach several times; the floor extrapolated to 1000 images lands near it."""
    from lightning_memwatch import FID

    g = torch.Generator().manual_seed(0)
    reference = torch.randn(20000, 1, 2, 4, generator=g)
    evaluator = FID(reference=reference, feature_extractor=torch.nn.Flatten(), cache=False).build(
        data_range=(-10.0, 10.0), device="cpu", fallback_reference=None, num_samples=1000
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer images than feature dimensions in the halves: expected here
        level = sum(evaluator.compute(torch.randn(1000, 1, 2, 4, generator=g)) for _ in range(4)) / 4
        old, new = [], []
        for _ in range(4):
            train = torch.randn(40, 1, 2, 4, generator=g)
            old.append(evaluator.compute(train, name="train"))
            new.append(evaluator.train_floor(train, num_samples=1000))
        assert evaluator.train_floor(train[:30], num_samples=20) == pytest.approx(
            evaluator.compute(train[:20], name="train")
        )  # enough images: the FID of the first num_samples
    old_error, new_error = abs(sum(old) / 4 - level), abs(sum(new) / 4 - level)
    assert old_error > 10 * level  # the inflation the floor had
    assert new_error < 0.25 * old_error and all(0 <= f <= o for f, o in zip(new, old, strict=True))

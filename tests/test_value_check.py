"""The samples' value distribution against the training images' (lightning_memwatch.value_check): samples on
another part of the training range than every training image raise, everywhere samples are measured; the
legitimate look-alikes (an untrained model's noise, a blob, a collapse onto one kind of training image, a data
set on a narrow part of data_range) pass."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from sklearn.datasets import load_digits
from toys import ToyDiffusion, toy_loader

from lightning_memwatch import EvalSchedule, Evaluator, MemWatch, memorization_fraction
from lightning_memwatch.metrics.memorization import MemorizationFraction, memorization_ratios
from lightning_memwatch.value_check import ValueProfile, check_values, merge, missing_side


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """200 real 8x8 digits in [-1, 1] (most pixels are background at -1)."""
    return torch.tensor(load_digits().images[:200], dtype=torch.float32)[:, None] / 16 * 2 - 1


def test_copies_in_0_1_of_training_images_in_minus1_1_raise_everywhere(digits: torch.Tensor) -> None:
    copies = (digits[:100] + 1) / 2  # a diffusers pipeline's post-processing of exact copies
    assert memorization_fraction(digits[:100], digits).fraction == 1.0  # the same copies on the right scale
    for call in (
        lambda: memorization_fraction(copies, digits),
        lambda: memorization_ratios(copies, digits),
        lambda: MemorizationFraction(digits).update(copies),
        lambda: Evaluator(digits, data_range=(-1.0, 1.0), bootstrap=10).evaluate(copies, step=0),
    ):
        with pytest.raises(ValueError, match=r"none below 0.*training images span \[-1, 1\].*x \* 2 - 1"):
            call()


def test_copies_in_0_255_of_training_images_in_0_1_raise(digits: torch.Tensor) -> None:
    train = (digits + 1) / 2
    with pytest.raises(ValueError, match=r"span \[0, 255\].*data_range is \(0, 1\)"):
        memorization_fraction(train[:50] * 255, train)


def test_scripted_copier_in_0_1_fails_the_fit_loudly(digits: torch.Tensor) -> None:
    """A model whose sampler copies training images in [0, 1] while the data are in [-1, 1]: the fit stops at
    the first evaluation with the error, instead of logging f_mem = 0."""
    model = ToyDiffusion(digits, memorize_from=0)
    original = model.sample
    model.sample = lambda n, generator=None, noise=None: (original(n, generator, noise) + 1) / 2  # type: ignore
    watch = MemWatch(num_samples=64, sample_batch_size=64, schedule=EvalSchedule.every(2), bootstrap=10,
                     log_images=False, verbose=False)  # fmt: skip
    trainer = Trainer(max_steps=4, accelerator="cpu", callbacks=[watch], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"MemWatch samples at step 2 .*none below 0"):
        trainer.fit(model, toy_loader(digits, batch_size=50))
    assert watch.history == []


def test_legitimate_samples_pass(digits: torch.Tensor) -> None:
    g = torch.Generator().manual_seed(0)
    profile = ValueProfile.of(digits)
    untrained = (torch.randn(100, 1, 8, 8, generator=g)).clamp(-1, 1)  # noisy and wide
    unclamped = 0.3 * torch.randn(100, 1, 8, 8, generator=g)  # narrower noise around the midpoint
    blob = 0.2 + 0.01 * torch.randn(100, 1, 8, 8, generator=g)  # an early near-constant output
    for samples in (untrained, unclamped, blob, digits[:100], digits[:100] + 0.05 * torch.randn(100, 1, 8, 8)):
        assert missing_side(samples, profile) is None
        check_values(samples, profile, "samples")
    # a data set of dark and bright images, a model that collapsed onto the bright ones: some training images
    # have no dark values, so the samples occupy a part of the range that training images do
    dark = -0.9 + 0.1 * torch.rand(50, 1, 8, 8, generator=g)
    bright = 0.2 + 0.8 * torch.rand(50, 1, 8, 8, generator=g)
    two_kinds = torch.cat([dark, bright])
    assert missing_side(bright[:20], ValueProfile.of(two_kinds)) is None
    memorization_fraction(bright[:20], two_kinds)
    # a data set on a narrow part of data_range, an untrained model's wide samples
    narrow = 0.3 + 0.3 * torch.rand(100, 1, 8, 8, generator=g)
    wide = torch.rand(100, 1, 8, 8, generator=g)
    assert missing_side(wide, ValueProfile.of(narrow)) is None
    with pytest.warns(UserWarning, match="only 30% of data_range"):
        evaluator = Evaluator(narrow, data_range=(0.0, 1.0), bootstrap=10)
    evaluator.evaluate(wide, step=0)


def test_profile_of_blocks_merges_to_the_profile_of_the_set(digits: torch.Tensor) -> None:
    whole = ValueProfile.of(digits)
    blocks = [ValueProfile.of(block, value_range=(whole.low, whole.high)) for block in digits.split(70)]
    assert merge(blocks) == whole
    gathered = ValueProfile.build(digits[:70], gather=lambda obj: [obj, obj])  # two identical blocks
    assert gathered.num_images == 140 and sum(gathered.counts) == 2 * 70 * 64
    assert whole.midpoint == pytest.approx(0.0) and whole.share("below") > 0.5

"""The GMM residual MLP: parameter counts, encoding, shapes."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_memwatch.apps.models.gmm_mlp import ResidualMLP, interleaved_time_encoding
from lightning_memwatch.apps.models.unet import count_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize(("dim", "count"), [(8, 102_024), (16, 104_080), (32, 108_192)])
def test_parameter_counts_match_the_paper_model(dim: int, count: int) -> None:
    model = ResidualMLP(dim=dim, width=128, num_blocks=3)
    assert count_parameters(model) == count
    assert len(model.blocks) == 3


def test_encoding_interleaves_cos_and_sin() -> None:
    enc = interleaved_time_encoding(10000, 128)
    assert enc.shape == (10000, 128)
    assert torch.equal(enc[0, 0::2], torch.ones(64)) and torch.equal(enc[0, 1::2], torch.zeros(64))
    assert enc[3, 0].item() == pytest.approx(math.cos(3.0), abs=1e-6)
    assert enc[3, 1].item() == pytest.approx(math.sin(3.0), abs=1e-6)
    freq = 1e-4 ** (2 * 5 / 128)
    assert enc[999, 11].item() == pytest.approx(math.sin(999 * freq), abs=1e-5)


def test_shapes_vectors_and_images_and_time_dependence() -> None:
    model = ResidualMLP(dim=8).eval()
    x = torch.randn(5, 8)
    out = model(x, torch.full((5,), 10))
    assert out.shape == (5, 8)
    assert not torch.allclose(out, model(x, torch.full((5,), 900)))
    images = ResidualMLP(dim=64)
    assert images(torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="Set dim"):
        model(torch.randn(2, 9), torch.tensor([1, 2]))

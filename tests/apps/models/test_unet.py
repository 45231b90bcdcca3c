"""The paper's U-Net: parameter count, shapes, layout (attention placement), dropout, time embedding."""

from __future__ import annotations

import pytest
import torch

from lightning_memwatch.apps.models.unet import ResBlock, SelfAttention2d, UNet, count_parameters, sinusoidal_table

torch.set_num_threads(1)


def test_w32_parameter_count_matches_the_paper_model() -> None:
    model = UNet(base_width=32)
    # 4.023 M trainable (paper_protocol.md 2.1, derived from the authors' code) + the frozen 1000 x W table.
    assert count_parameters(model) == 4_023_233
    assert count_parameters(model, trainable_only=False) == 4_023_233 + 1000 * 32
    assert round(count_parameters(model) / 1e6, 3) == 4.023


@pytest.mark.parametrize(
    ("width", "millions"), [(8, 0.255), (16, 1.011), (24, 2.267), (48, 9.038), (64, 16.05)]
)
def test_parameter_count_table_for_other_widths(width: int, millions: float) -> None:
    assert count_parameters(UNet(base_width=width)) / 1e6 == pytest.approx(millions, rel=1e-3)


def test_output_shape_equals_input_shape_and_depends_on_t() -> None:
    model = UNet(base_width=8).eval()
    x = torch.randn(3, 1, 32, 32)
    out = model(x, torch.tensor([1, 500, 999]))
    assert out.shape == x.shape
    other = model(x, torch.tensor([2, 501, 0]))
    assert not torch.allclose(out, other)
    assert UNet(base_width=8)(torch.randn(2, 1, 8, 8), torch.tensor([3, 4])).shape == (2, 1, 8, 8)
    assert UNet(base_width=8, in_channels=3)(torch.randn(1, 3, 16, 16), torch.tensor([3])).shape == (
        1,
        3,
        16,
        16,
    )


def test_attention_only_at_16_and_8_pixels_and_in_the_first_bottleneck_block() -> None:
    model = UNet(base_width=8).eval()
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[-1]))
        for m in model.modules()
        if isinstance(m, SelfAttention2d)
    ]
    model(torch.randn(1, 1, 32, 32), torch.tensor([10]))
    for h in hooks:
        h.remove()
    # encoder 2 + 2, bottleneck 1, decoder 3 + 3 (decoder order: 8 px first)
    assert sorted(sizes) == [8] * 6 + [16] * 5
    assert isinstance(model.middle[0].attn, SelfAttention2d) and not isinstance(
        model.middle[1].attn, SelfAttention2d
    )
    heads = {m.attn.num_heads for m in model.modules() if isinstance(m, SelfAttention2d)}
    assert heads == {4}


def test_block_counts_and_channel_widths() -> None:
    model = UNet(base_width=16)
    down = [m for m in model.down if isinstance(m, ResBlock)]
    up = [m for m in model.up if isinstance(m, ResBlock)]
    assert [b.conv2.out_channels for b in down] == [16, 16, 32, 32, 64, 64]
    assert [b.conv2.out_channels for b in up] == [64] * 3 + [32] * 3 + [16] * 3
    strided = [m for m in model.down if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in strided] == [(2, 2), (2, 2)]
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}


def test_dropout_is_active_in_train_mode_only() -> None:
    torch.manual_seed(0)
    model = UNet(base_width=8, dropout=0.1)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout2d)]
    assert len(drops) == 6 + 2 + 9 and {d.p for d in drops} == {0.1}
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 6])
    model.eval()
    assert torch.equal(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_time_table_is_frozen_sinusoid() -> None:
    table = sinusoidal_table(1000, 8)
    assert table.shape == (1000, 8)
    assert torch.equal(table[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert table[7, 0] == pytest.approx(torch.sin(torch.tensor(7.0)).item(), abs=1e-6)
    model = UNet(base_width=8)
    assert not model.time_embedding.table.weight.requires_grad
    assert isinstance(model.time_embedding.mlp[1], torch.nn.GELU)
    assert model.time_embedding.mlp[2].out_features == 32


def test_bad_configuration_and_input_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="multiple of groups"):
        UNet(base_width=12)
    with pytest.raises(ValueError, match="one entry per level"):
        UNet(base_width=8, channel_mults=(1, 2), attention=(False,))
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(base_width=8)(torch.randn(1, 1, 30, 30), torch.tensor([1]))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        UNet(base_width=8)(torch.randn(1, 3, 32, 32), torch.tensor([1]))


def test_attention_equals_nn_multihead_attention() -> None:
    block = SelfAttention2d(16, num_heads=4).eval()
    x = torch.randn(2, 16, 8, 8)
    seq = block.norm(x).reshape(2, 16, 64).transpose(1, 2)
    reference, _ = block.attn(seq, seq, seq, need_weights=False)
    expected = x + reference.transpose(1, 2).reshape(2, 16, 8, 8)
    assert torch.allclose(block(x), expected, atol=1e-5)

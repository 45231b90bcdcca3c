"""``memwatch demo --finetune`` (lightning_memwatch.apps.finetune): the split, the datamodule, the command."""

from __future__ import annotations

import torch

from lightning_memwatch.apps.demo import build_parser
from lightning_memwatch.apps.finetune import FinetuneConfig, digit_split, finetune_datamodule, pretrain


def test_the_split_keeps_the_finetune_images_out_of_pretraining_and_reference():
    split = digit_split(9, 16, seed=0)
    assert split["finetune"].shape == (16, 1, 8, 8) and len(split["reference"]) + 16 == 180
    assert len(split["pretrain"]) == 1797 - 180 and not bool((split["pretrain_labels"] == 9).any())
    flat = lambda x: {tuple(row.tolist()) for row in x.flatten(1)}  # noqa: E731
    assert not flat(split["finetune"]) & flat(split["reference"])
    assert float(split["finetune"].min()) >= -1 and float(split["finetune"].max()) <= 1
    assert torch.equal(digit_split(9, 16, seed=0)["finetune"], split["finetune"])  # seeded


def test_the_datamodule_gives_memwatch_its_images_range_and_reference():
    dm = finetune_datamodule(digit=3, n=8, passes_per_epoch=5)
    assert dm.data_range == (-1.0, 1.0) and dm.train_images().shape == (8, 1, 8, 8)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5 and all(len(b[0]) == 8 for b in batches)  # full batch, 5 passes per epoch
    assert len(dm.reference_images()) == len(digit_split(3, 8)["reference"])


def test_pretraining_is_saved_and_loaded(tmp_path):
    config = FinetuneConfig(out=tmp_path, pretrain_steps=3, pretrain_batch=8, threads=1)
    images = digit_split(9, 16)["pretrain"][:32]
    said: list[str] = []
    torch.manual_seed(123)
    first = pretrain(config, images, said.append)
    state_after_training = torch.get_rng_state()
    torch.manual_seed(456)
    again = pretrain(config, images, said.append)
    assert "saved to" in said[0] and "loaded from" in said[1]
    # the fine-tune after it starts from the same random state whether the model was trained or loaded
    assert torch.equal(state_after_training, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))


def test_the_command_takes_the_flag():
    args = build_parser().parse_args(["--finetune", "--out", "/tmp/x"])
    assert args.finetune and str(args.out) == "/tmp/x"

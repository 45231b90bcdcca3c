"""select_rows: one block of an image source, read without reading the other rows."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, SubsetRandomSampler, TensorDataset

from lightning_memwatch.images import collect_images, select_rows

IMAGES = torch.arange(10 * 4, dtype=torch.float32).reshape(10, 1, 2, 2) / 40


class Counting(Dataset):
    def __init__(self):
        self.read: list[int] = []

    def __len__(self):
        return len(IMAGES)

    def __getitem__(self, i):
        self.read.append(int(i))
        return IMAGES[i], 0


def test_each_source_kind_gives_the_block_of_collect_images():
    loader = DataLoader(TensorDataset(IMAGES, torch.zeros(10)), batch_size=3, shuffle=True)
    split = DataLoader(TensorDataset(IMAGES), batch_size=4, sampler=SubsetRandomSampler([9, 1, 4, 7, 2]))
    for source in (IMAGES, TensorDataset(IMAGES), loader, split):
        whole = collect_images(source)
        for rows in (range(0, 3), range(3, len(whole)), range(2, 3)):
            block = collect_images(select_rows(source, rows), min_rows=1)
            assert torch.equal(block, whole[rows.start : rows.stop])
    assert torch.equal(collect_images(select_rows(split, range(1, 3)), min_rows=1), IMAGES[[2, 4]])


def test_only_the_block_is_read_and_bad_rows_raise():
    dataset = Counting()
    assert torch.equal(collect_images(select_rows(dataset, range(4, 7)), min_rows=1), IMAGES[4:7])
    assert sorted(dataset.read) == [4, 5, 6]
    with pytest.raises(ValueError, match="do not lie in the 10 images"):
        select_rows(dataset, range(8, 12))

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(IMAGES)

    with pytest.raises(TypeError, match="iterable Dataset has no rows to pick"):
        select_rows(Stream(), range(0, 2))


def test_positions_in_any_order_with_repeats_are_read_alone():
    dataset = Counting()
    split = DataLoader(dataset, batch_size=4, sampler=SubsetRandomSampler([9, 1, 4, 7, 2]))
    for source, drawn in ((IMAGES, IMAGES), (dataset, IMAGES), (split, IMAGES[[1, 2, 4, 7, 9]])):
        dataset.read.clear()
        picked = collect_images(select_rows(source, [3, 0, 3]), min_rows=1)
        assert torch.equal(picked, drawn[[3, 0, 3]])
        assert source is IMAGES or sorted(dataset.read) == sorted([3, 0, 3] if source is dataset else [7, 1, 7])
    with pytest.raises(ValueError, match=r"rows \[2, 5\] do not lie in the 5 images"):
        select_rows(split, [2, 5])

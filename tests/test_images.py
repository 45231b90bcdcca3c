"""The one image-source reader (lightning_memwatch/images.py): tensors, Datasets and DataLoaders read by one set
of rules, for MemWatch's training images, the FID reference and the probe alike."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset, Sampler, SubsetRandomSampler, TensorDataset

from lightning_memwatch.images import collect_images, iter_image_batches, num_images, sampler_rows

IMAGES = torch.randn(30, 1, 4, 4, generator=torch.Generator().manual_seed(0))


class DictDataset(Dataset):
    def __len__(self) -> int:
        return len(IMAGES)

    def __getitem__(self, i: int) -> dict:
        return {"label": i, "image": IMAGES[i]}


class EveryThird(Sampler):
    def __iter__(self):
        return iter(range(0, 30, 3))

    def __len__(self) -> int:
        return 10


def _sizes(batches: list[torch.Tensor]) -> list[int]:
    return [len(b) for b in batches]


def test_tensor_is_cut_into_views_of_exactly_batch_size() -> None:
    batches = list(iter_image_batches(IMAGES, 8, "images"))
    assert _sizes(batches) == [8, 8, 8, 6]
    assert all(b.data_ptr() == IMAGES[8 * i].data_ptr() for i, b in enumerate(batches))  # views, no copies
    assert num_images(IMAGES) == 30
    assert collect_images(IMAGES).data_ptr() == IMAGES.data_ptr()  # a float tensor comes back uncopied


def test_dataset_items_of_every_shape_read_in_index_order() -> None:
    for dataset in (TensorDataset(IMAGES, torch.arange(30)), DictDataset()):
        batches = list(iter_image_batches(dataset, 7, "reference"))
        assert _sizes(batches) == [7, 7, 7, 7, 2]
        assert torch.equal(torch.cat(batches), IMAGES)
        assert torch.equal(collect_images(dataset, batch_size=4), IMAGES)
        assert num_images(dataset) == 30


def test_dataloader_batches_are_re_cut_and_its_shuffling_and_drop_last_ignored() -> None:
    loader = DataLoader(TensorDataset(IMAGES), batch_size=4, shuffle=True, drop_last=True)
    batches = list(iter_image_batches(loader, 11, "reference"))
    assert _sizes(batches) == [11, 11, 8]  # the loader's own batch size (4) and drop_last play no part
    assert torch.equal(torch.cat(batches), IMAGES)  # dataset order, every row
    assert num_images(loader) == 30


def test_subset_random_sampler_leaves_the_held_out_rows_out() -> None:
    train_rows = [r for r in range(30) if r % 3 != 0]  # rows 0, 3, 6, ... are held out
    loader = DataLoader(TensorDataset(IMAGES, torch.arange(30)), batch_size=5, sampler=SubsetRandomSampler(train_rows))
    assert torch.equal(torch.cat(list(iter_image_batches(loader, 6, "train_data"))), IMAGES[train_rows])
    assert torch.equal(collect_images(loader), IMAGES[train_rows])
    assert num_images(loader) == len(train_rows) == 20
    assert sampler_rows(loader, "train_data") == train_rows


def test_unreadable_sampler_and_wrong_sources_raise_one_error_policy() -> None:
    loader = DataLoader(TensorDataset(IMAGES), batch_size=4, sampler=EveryThird())
    for read in (lambda: collect_images(loader), lambda: next(iter_image_batches(loader, 4, "reference"))):
        with pytest.raises(ValueError, match=r"EveryThird.*MemWatch\(train_data=.*FID\(reference="):
            read()
        with pytest.raises(MisconfigurationException, match="EveryThird"):
            read()
    with pytest.raises(TypeError, match="reference must be a Tensor, Dataset or DataLoader"):
        next(iter_image_batches([IMAGES], 4, "reference"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        collect_images(TensorDataset(torch.empty(0, 1, 4, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        collect_images((IMAGES * 100).long())
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(iter_image_batches(IMAGES, 0))


def test_sources_are_never_modified() -> None:
    before = IMAGES.clone()
    dataset = TensorDataset(IMAGES)
    collect_images(dataset).add_(1.0)  # the collected tensor of a Dataset is a new one
    assert torch.equal(IMAGES, before)


class _Endless(torch.utils.data.IterableDataset):
    """An endless stream of ``(image, label)`` pairs (as ``repeat()`` or ``itertools.cycle`` makes one)."""

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            yield torch.rand(1, 8, 8, generator=g), 1


class _Finite(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter([(torch.full((1, 8, 8), float(i)), i) for i in range(40)])


def test_an_endless_stream_raises_where_it_would_be_held_and_streams_where_it_is_not(monkeypatch) -> None:
    import itertools

    from lightning_memwatch import images, labels
    from lightning_memwatch.labels import read_labelled_images, read_train_labels

    limit = 100 * 256  # the bytes of 100 images of 1 x 8 x 8 float32
    monkeypatch.setattr(images, "stream_limit", lambda: limit)
    monkeypatch.setattr(labels, "stream_limit", lambda: limit)
    for read in (collect_images, read_train_labels, read_labelled_images):
        for source in (_Endless(), DataLoader(_Endless(), batch_size=7)):
            with pytest.raises(ValueError, match=r"yielded 512 images .* without ending.*MemWatch\(train_data="):
                read(source)
    finite = _Finite()  # 40 images: under the limit
    assert torch.equal(collect_images(finite)[:, 0, 0, 0], torch.arange(40.0))
    assert torch.equal(read_train_labels(finite), torch.arange(40))
    # a reader that keeps nothing (FID's statistics) streams any length
    assert len(list(itertools.islice(iter_image_batches(_Endless(), 16), 20))) == 20


def test_dict_batches_of_the_diffusers_scripts_give_their_pixel_values() -> None:
    from lightning_memwatch._checks import images_of_batch

    ids = torch.arange(12).reshape(3, 4)  # token ids (or classes) first, as a text-to-image script's batch
    pixels = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert images_of_batch({"input_ids": ids, "pixel_values": pixels}) is pixels
    assert images_of_batch({"ids": ids, "pixels": pixels}) is pixels  # no known key: the first float tensor
    with pytest.raises(TypeError, match="dtype torch.int64"):
        collect_images(DataLoader([{"ids": ids[i]} for i in range(3)], batch_size=2))  # no images: named

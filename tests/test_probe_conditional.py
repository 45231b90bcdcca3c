"""The loss-gap probe on class-conditional models: pairs of one class, scored asking for that class."""

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import TensorDataset
from toys import toy_images, toy_labelled_loader

from lightning_memwatch._checks import ConfigError
from lightning_memwatch.apps.models import DDPM, ResidualMLP
from lightning_memwatch.callbacks.probe import LossGapProbe
from lightning_memwatch.metrics.loss_gap import ProbeTriples, draw_probe_triples, measure_loss_gap

TRAIN, HELDOUT = toy_images(30, seed=0), toy_images(40, seed=1)
TRAIN_LABELS, HELDOUT_LABELS = torch.arange(30) % 3, torch.arange(40) % 4  # held-out has a class more


def conditional_ddpm(seed: int = 0, **kwargs) -> DDPM:
    torch.manual_seed(seed)
    return DDPM(ResidualMLP(dim=64, width=16, num_blocks=1, num_classes=4), optimizer="adam", lr=1e-2, **kwargs)


def fit(tmp_path, probe, max_steps=4):
    trainer = Trainer(max_steps=max_steps, callbacks=[probe], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    module = conditional_ddpm()
    trainer.fit(module, toy_labelled_loader(TRAIN, TRAIN_LABELS, batch_size=10))
    return module


# -- the maths ----------------------------------------------------------------------------------------------
def test_each_training_image_is_paired_with_a_heldout_image_of_its_class():
    triples = draw_probe_triples(TRAIN, HELDOUT, num_triples=50, num_timesteps=100, num_bands=2,
                                 train_labels=TRAIN_LABELS, heldout_labels=HELDOUT_LABELS)  # fmt: skip
    assert triples.labels is not None
    assert torch.equal(triples.labels, TRAIN_LABELS[triples.train_indices])
    assert torch.equal(triples.labels, HELDOUT_LABELS[triples.heldout_indices])
    assert torch.equal(triples.heldout, HELDOUT[triples.heldout_indices])
    # every held-out image of a class (10 of class 0) is used before one is used twice
    zero = triples.heldout_indices[triples.labels == 0]
    assert len(zero) > 10 and len(zero[:10].unique()) == 10
    again = ProbeTriples.from_state_dict(triples.state_dict())
    assert again.labels is not None and torch.equal(again.labels, triples.labels)


def test_the_loss_is_asked_for_the_pair_class():
    # loss = 1 + label for a training image (all 0), 2 + label for a held-out image (all 1): the mean gap follows
    train, heldout = torch.zeros(6, 1, 2, 2), torch.ones(6, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    triples = draw_probe_triples(train, heldout, num_triples=6, num_timesteps=10, num_bands=1,
                                 train_labels=labels, heldout_labels=labels)  # fmt: skip
    reading = measure_loss_gap(lambda x0, t, noise, y: 1.0 + x0.flatten(1).mean(1) + y, triples)
    assert reading.loss_train == pytest.approx(2.0) and reading.loss_heldout == pytest.approx(3.0)


def test_labels_must_come_in_pairs_and_cover_the_training_classes():
    with pytest.raises(ConfigError, match="both train_labels and heldout_labels"):
        draw_probe_triples(TRAIN, HELDOUT, train_labels=TRAIN_LABELS)
    with pytest.raises(ConfigError, match=r"no image of class\(es\) \[2\]"):
        draw_probe_triples(TRAIN, HELDOUT, num_triples=30, train_labels=TRAIN_LABELS,
                           heldout_labels=HELDOUT_LABELS % 2)  # fmt: skip
    with pytest.raises(ConfigError, match="holds 29 labels for 30 images"):
        draw_probe_triples(TRAIN, HELDOUT, train_labels=TRAIN_LABELS[:29], heldout_labels=HELDOUT_LABELS)
    with pytest.raises(TypeError, match="LongTensor"):
        draw_probe_triples(TRAIN, HELDOUT, train_labels=TRAIN_LABELS.float(), heldout_labels=HELDOUT_LABELS)


# -- the callback -------------------------------------------------------------------------------------------
def test_a_conditional_ddpm_is_probed_with_the_labels_of_its_data(tmp_path):
    probe = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=24, every_n_train_steps=2)
    module = fit(tmp_path, probe)
    triples = probe.triples
    assert triples is not None and triples.labels is not None
    assert torch.equal(triples.labels, TRAIN_LABELS[triples.train_indices])
    assert torch.equal(triples.labels, HELDOUT_LABELS[triples.heldout_indices])
    assert [r.step for r in probe.history] == [0, 2, 4]
    # the last reading (after the last step) is the module's own conditional loss on the pairs
    again = measure_loss_gap(module.denoising_loss, triples)
    last = probe.history[-1]
    assert again.loss_train == pytest.approx(last.loss_train, rel=1e-5)
    wrong = ProbeTriples(**{**triples.__dict__, "labels": (triples.labels + 1) % 4})
    assert measure_loss_gap(module.denoising_loss, wrong).loss_train != pytest.approx(last.loss_train, rel=1e-3)


def test_missing_heldout_labels_fail_at_setup_naming_the_argument(tmp_path):
    probe = LossGapProbe(heldout_data=HELDOUT, num_triples=8, every_n_train_steps=2)
    with pytest.raises(ConfigError, match=r"LossGapProbe\(heldout_labels=") as info:
        fit(tmp_path, probe)
    assert "class-conditional" in str(info.value)
    # given, they are used
    probe = LossGapProbe(heldout_data=HELDOUT, heldout_labels=HELDOUT_LABELS, num_triples=8, every_n_train_steps=2)
    fit(tmp_path, probe, max_steps=1)
    assert torch.equal(probe.triples.labels, HELDOUT_LABELS[probe.triples.heldout_indices])


def test_a_conditional_model_whose_loss_takes_no_class_is_refused(tmp_path):
    class NoClassLoss(DDPM):
        def denoising_loss(self, x0, t, noise):
            return super().denoising_loss(x0, t, noise)

    torch.manual_seed(0)
    module = NoClassLoss(ResidualMLP(dim=64, width=16, num_blocks=1, num_classes=4), optimizer="adam", lr=1e-2)
    probe = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=8, every_n_train_steps=2)
    trainer = Trainer(max_steps=2, callbacks=[probe], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.raises(ConfigError, match=r"takes no class.*`labels` argument"):
        trainer.fit(module, toy_labelled_loader(TRAIN, TRAIN_LABELS, batch_size=10))
    assert trainer.global_step == 0


def test_resume_keeps_the_pairs_and_their_classes_and_refuses_a_set_drawn_for_another_model(tmp_path):
    probe = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=8, every_n_train_steps=2)
    fit(tmp_path, probe, max_steps=1)
    resumed = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=8, every_n_train_steps=2)
    resumed.load_state_dict(probe.state_dict())
    fit(tmp_path, resumed, max_steps=1)
    assert torch.equal(resumed.triples.labels, probe.triples.labels)
    assert torch.equal(resumed.triples.heldout_indices, probe.triples.heldout_indices)
    unconditional = draw_probe_triples(TRAIN, HELDOUT, num_triples=8, num_timesteps=1000)
    stale = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=8, every_n_train_steps=2)
    stale.load_state_dict({"history": [], "last_step": None, "period": 2, "triples": unconditional.state_dict()})
    with pytest.raises(ConfigError, match="drawn without classes"):
        fit(tmp_path, stale, max_steps=1)


def test_the_classes_come_from_the_datamodules_label_methods(tmp_path):
    import lightning as L

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return toy_labelled_loader(TRAIN, TRAIN_LABELS, batch_size=10)

        def train_images(self):
            return TRAIN

        def train_labels(self):
            return TRAIN_LABELS

        def reference_images(self):
            return HELDOUT

        def heldout_labels(self):
            return HELDOUT_LABELS

    probe = LossGapProbe(num_triples=12, every_n_train_steps=2)
    trainer = Trainer(max_steps=1, callbacks=[probe], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    trainer.fit(conditional_ddpm(), datamodule=DM())
    triples = probe.triples
    assert torch.equal(triples.labels, TRAIN_LABELS[triples.train_indices])
    assert torch.equal(triples.labels, HELDOUT_LABELS[triples.heldout_indices])
    assert len(probe.history) == 1


def test_an_adaptive_schedule_reads_the_conditional_probe(tmp_path):
    from lightning_memwatch import AdaptiveSchedule, MemWatch

    probe = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=12, every_n_train_steps=2)
    schedule = AdaptiveSchedule(min_every=2, max_every=8, probe=probe, f_mem_target=0.5)
    watch = MemWatch(num_samples=8, sample_batch_size=4, schedule=schedule, bootstrap=20, log_images=False,
                     verbose=False, data_range=(-1.0, 1.0))  # fmt: skip
    trainer = Trainer(max_steps=8, callbacks=[watch, probe], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    module = conditional_ddpm(data_range=(-1.0, 1.0), sample_steps=4)  # samples clamped to the data's range
    trainer.fit(module, toy_labelled_loader(TRAIN, TRAIN_LABELS, batch_size=10))
    assert [r.step for r in probe.history] == [0, 2, 4, 6, 8]
    assert probe.triples.labels is not None
    assert watch.history and watch.history[0]["step"] == 0
    assert watch.history[0].per_class  # class-conditional: MemWatch asked for classes too
    assert schedule.decisions  # the schedule planned from the readings


def test_the_training_images_and_classes_come_from_the_paired_memwatch(tmp_path):
    from lightning_memwatch import EvalSchedule, MemWatch

    # the loader's labels disagree with MemWatch's: the probe reads MemWatch's images with MemWatch's classes
    images, classes = TRAIN.flip(0), (TRAIN_LABELS + 1) % 3
    watch = MemWatch(train_data=images, train_labels=classes, num_samples=4, sample_batch_size=4, log_images=False,
                     schedule=EvalSchedule(steps=[100]), verbose=False, data_range=(-1.0, 1.0))  # fmt: skip
    probe = LossGapProbe(heldout_data=TensorDataset(HELDOUT, HELDOUT_LABELS), num_triples=12, every_n_train_steps=2)
    trainer = Trainer(max_steps=1, callbacks=[watch, probe], logger=False, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=str(tmp_path))  # fmt: skip
    with pytest.warns(UserWarning, match="never fires"):
        trainer.fit(conditional_ddpm(data_range=(-1.0, 1.0)), toy_labelled_loader(TRAIN, TRAIN_LABELS, batch_size=10))
    triples = probe.triples
    assert torch.equal(triples.train, images[triples.train_indices])
    assert torch.equal(triples.labels, classes[triples.train_indices])
    assert torch.equal(triples.labels, HELDOUT_LABELS[triples.heldout_indices])


def test_only_the_drawn_rows_of_a_dataset_are_read():
    class Counting(torch.utils.data.Dataset):
        def __init__(self, images, labels):
            self.images, self.labels, self.read = images, labels, []

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            self.read.append(int(i))
            return self.images[i], self.labels[i]

    train, heldout = Counting(TRAIN, TRAIN_LABELS), Counting(HELDOUT, HELDOUT_LABELS)
    triples = draw_probe_triples(train, heldout, num_triples=12, num_timesteps=100, train_labels=TRAIN_LABELS,
                                 heldout_labels=HELDOUT_LABELS)  # fmt: skip
    assert sorted(train.read) == sorted(triples.train_indices.tolist())
    assert sorted(heldout.read) == sorted(triples.heldout_indices.tolist())
    # the same triples as from the tensors: the rows drawn depend only on the counts, the seed and the labels
    whole = draw_probe_triples(TRAIN, HELDOUT, num_triples=12, num_timesteps=100, train_labels=TRAIN_LABELS,
                               heldout_labels=HELDOUT_LABELS)  # fmt: skip
    for name in ("train", "heldout", "t", "noise", "train_indices", "heldout_indices", "labels"):
        assert torch.equal(getattr(triples, name), getattr(whole, name)), name

"""Train the tutorial model with MemWatch, MemorizationEarlyStopping and TensorBoard, on a CPU."""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from tutorial_module import TinyDiffusion

from lightning_memwatch import FID, EvalSchedule, MemorizationEarlyStopping, MemWatch


def digits(n: int, seed: int = 0):
    """`n` training digits; the other 1797 - n digits held out. Images (N, 1, 8, 8) in [-1, 1], labels 0-9."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(data.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, heldout = order[:n], order[n:]
    return images[train], images[heldout], labels[heldout]


def digit_features(images, labels, steps=300):
    """A small digit classifier trained on held-out digits; as a module it returns its 64 features per image.

    Inception (the standard FID network) means nothing at 8x8 and is slow on a CPU, so FID here is a Frechet
    distance in this network's features.
    """
    features = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
    head = nn.Linear(64, 10)
    optimizer = torch.optim.Adam([*features.parameters(), *head.parameters()], lr=3e-3)
    for _ in range(steps):
        noisy = images + 0.1 * torch.randn_like(images)  # so that imperfect samples get meaningful features
        loss = nn.functional.cross_entropy(head(features(noisy)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return features.eval().requires_grad_(False)


def main(n=256, max_steps=20_000, eval_every=250, num_samples=256, log_dir="runs/tutorial", **trainer_kwargs):
    L.seed_everything(0)
    train, heldout, heldout_labels = digits(n)
    dataset = TensorDataset(train)
    # Full batch (batch = n); 100 shuffled passes per Lightning epoch keep the per-epoch overhead low.
    loader = DataLoader(dataset, batch_size=n, sampler=RandomSampler(dataset, num_samples=100 * n))

    # --8<-- [start:callbacks]
    watch = MemWatch(
        num_samples=num_samples,  # generated images per evaluation
        sample_batch_size=num_samples,
        schedule=EvalSchedule.every(eval_every, include_zero=True),
        data_range=(-1.0, 1.0),
        fid=FID(reference=heldout, feature_extractor=digit_features(heldout, heldout_labels)),
    )
    stopper = MemorizationEarlyStopping(watch, verbose=True)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[watch, stopper],
        logger=TensorBoardLogger(log_dir, name="tiny_diffusion"),
        log_every_n_steps=50,
        accelerator="cpu",
        devices=1,
        **trainer_kwargs,
    )
    model = TinyDiffusion()
    trainer.fit(model, loader)  # MemWatch reads the training images from this loader
    # --8<-- [end:callbacks]

    print(f"tau_gen = {watch.tau_gen}, tau_mem = {watch.tau_mem} (optimizer steps)")
    print(f"stopped at step {stopper.stopped_step}; weights of step {stopper.restored_step} restored")
    print(f"TensorBoard: tensorboard --logdir {log_dir} --host 127.0.0.1")
    return watch, stopper, model


if __name__ == "__main__":
    main()

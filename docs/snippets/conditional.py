"""A class-conditional model under MemWatch: per-class f_mem and tau_mem, the copied training images."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_memwatch import EvalSchedule, MemorizationEarlyStopping, MemWatch

MAX_STEPS = 1000


# --8<-- [start:module]
class ConditionalDDIM(L.LightningModule):
    """A small class-conditional denoiser (x0-prediction) with a deterministic DDIM sampler."""

    def __init__(self, num_classes: int, steps: int = 50) -> None:
        super().__init__()
        self.steps = steps
        self.register_buffer("alpha_bar", torch.cumprod(1 - torch.linspace(1e-4, 0.2, steps), dim=0))
        self.embed = nn.Embedding(num_classes, 16)  # the class embedding
        self.net = nn.Sequential(nn.Linear(64 + 1 + 16, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(),
                                 nn.Linear(256, 64))  # fmt: skip

    def denoise(self, x, t, labels):
        inputs = [x.flatten(1), t[:, None].float() / self.steps, self.embed(labels)]
        return self.net(torch.cat(inputs, dim=1)).view_as(x)

    def training_step(self, batch, batch_idx):
        x0, labels = batch  # (image, class) pairs: MemWatch reads the classes from here too
        t = torch.randint(0, self.steps, (len(x0),), device=self.device)
        a = self.alpha_bar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
        return (self.denoise(x_t, t, labels) - x0).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)

    @torch.no_grad()
    def sample(self, num_samples, generator=None, noise=None, labels=None):
        """``labels`` (B,) makes the sampler class-conditional: MemWatch passes one class per sample."""
        x = noise
        for t in reversed(range(self.steps)):
            a = self.alpha_bar[t]
            a_prev = self.alpha_bar[t - 1] if t > 0 else torch.ones((), device=self.device)
            x0 = self.denoise(x, torch.full((num_samples,), t, device=self.device), labels).clamp(0, 1)
            eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x
# --8<-- [end:module]


def main() -> MemWatch:
    torch.manual_seed(0)
    train = torch.rand(16, 1, 8, 8)  # 16 images in [0, 1], 4 classes
    labels = torch.arange(16) % 4
    # --8<-- [start:watch]
    watch = MemWatch(
        num_samples=200,  # 50 per class: per-class rules need at least 20 samples of a class
        schedule=EvalSchedule.every(100),
        data_range=(0.0, 1.0),
        labels="balanced",  # default None: drawn from the training labels' frequencies
    )
    stopper = MemorizationEarlyStopping(watch, per_class=True, strict=False)  # stop at the first class that copies
    trainer = L.Trainer(max_steps=MAX_STEPS, callbacks=[watch, stopper], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(ConditionalDDIM(num_classes=4), DataLoader(TensorDataset(train, labels), batch_size=16))
    # --8<-- [end:watch]
    # --8<-- [start:read]
    last = watch.history[-1]
    for label, per_class in last.per_class.items():  # f_mem per generated class, with its interval
        print(f"class {label}: f_mem = {per_class.f_mem:.2f} [{per_class.f_mem_ci_low:.2f}, "
              f"{per_class.f_mem_ci_high:.2f}] over {per_class.num_samples} samples")  # fmt: skip
    for label, event in watch.detector.class_tau_mem.items():  # per-class onsets (same rule and patience)
        print(f"class {label}: tau_mem at step {event.step}")
    for row in watch.copied_training_images()[:5]:  # most-copied first
        print(f"training image {row.train_index} (class {row.label}) copied {row.times_copied} times, "
              f"steps {row.first_step}-{row.last_step}")  # fmt: skip
    # --8<-- [end:read]
    return watch


if __name__ == "__main__":
    main()

"""Watch a plain PyTorch training loop (no Lightning): the Evaluator measures, the detector flags tau_mem."""

import torch
from torch import nn

from lightning_memwatch import Evaluator, TimescaleDetector

torch.manual_seed(0)
train = torch.rand(16, 1, 8, 8)  # 16 training images in [0, 1]: few enough for a small model to copy
T = 50  # diffusion steps
alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.2, T), dim=0)
net = nn.Sequential(nn.Linear(65, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 64))
optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)


def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model predicts the clean image x0 from the noisy image x at diffusion step t."""
    return net(torch.cat([x.flatten(1), t[:, None].float() / T], dim=1)).view_as(x)


@torch.no_grad()
def sample(num_samples: int, seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from the same noise at every evaluation."""
    x = torch.randn(num_samples, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    for t in reversed(range(T)):
        a, a_prev = alpha_bar[t], alpha_bar[t - 1] if t > 0 else torch.tensor(1.0)
        x0 = denoise(x, torch.full((num_samples,), t)).clamp(0, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


evaluator = Evaluator(train, data_range=(0.0, 1.0), bootstrap=200)  # indexes the training images once
detector = TimescaleDetector()  # no quality signal here: only tau_mem can fire
for step in range(1, 1201):
    x0 = train[torch.randint(len(train), (16,))]
    t = torch.randint(T, (16,))
    noise = torch.randn_like(x0)
    xt = alpha_bar[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - alpha_bar[t]).sqrt().view(-1, 1, 1, 1) * noise
    loss = (denoise(xt, t) - x0).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if step % 100 == 0:
        net.eval()
        record = evaluator.evaluate(sample(200), step)  # an EvalRecord
        net.train()
        print(f"step {record.step}: f_mem = {record.f_mem:.3f} [{record.f_mem_ci_low:.3f}, {record.f_mem_ci_high:.3f}]")
        if any(event.name == "tau_mem" for event in detector.update(record)):
            print(f"tau_mem at step {detector.tau_mem.step}: stop here and keep the weights of an earlier step")
            break

"""f_mem of a batch of samples without Lightning: the nearest-neighbour ratio test and its confidence interval."""

import torch

from lightning_memwatch import NearestNeighbourIndex, memorization_fraction

generator = torch.Generator().manual_seed(0)
train = torch.rand(500, 1, 8, 8, generator=generator) * 2 - 1  # 500 training images in [-1, 1]
index = NearestNeighbourIndex(train)  # built once, reused for every batch of samples

novel = torch.rand(996, 1, 8, 8, generator=generator) * 2 - 1  # new images: ratio d1/d2 close to 1
copies = train[:4] + 0.01 * torch.randn(4, 1, 8, 8, generator=generator)  # near-copies: ratio close to 0
result = memorization_fraction(torch.cat([novel, copies]), index)  # threshold 1/3, 1000 bootstrap resamples

print(f"f_mem = {result.fraction:.4f}, 95% CI [{result.ci_low:.4f}, {result.ci_high:.4f}]")
print("memorized samples:", result.memorized.nonzero().flatten().tolist())
print("their nearest training images:", result.nn_indices[result.memorized, 0].tolist())
print("median ratio of the novel samples:", round(float(result.ratios[:996].median()), 3))

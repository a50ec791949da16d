"""Synthetic activations from a planted sparse dictionary: the ground truth an SAE should recover."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


class PlantedDictionary:
    """x = Σ_{i ∈ active} c_i d_i + noise, with unit directions d_i, `n_active` active per sample, c_i > 0."""

    def __init__(self, d: int = 64, n_directions: int = 256, n_active: int = 4, noise: float = 0.01, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        dirs_ND = torch.randn(n_directions, d, generator=g)
        self.directions_ND = dirs_ND / dirs_ND.norm(dim=1, keepdim=True)
        self.n_active, self.noise = n_active, noise
        self._gen = torch.Generator().manual_seed(seed + 1)

    def sample(self, n: int) -> Tensor:
        n_dirs, d = self.directions_ND.shape
        # argsort of uniform noise = n_active distinct directions per row, uniformly chosen
        idx_NA = torch.rand(n, n_dirs, generator=self._gen).argsort(dim=1)[:, : self.n_active]
        coef_NA = 0.5 + torch.rand(n, self.n_active, generator=self._gen)
        x_ND = (coef_NA.unsqueeze(-1) * self.directions_ND[idx_NA]).sum(1)
        return x_ND + self.noise * torch.randn(n, d, generator=self._gen)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        while True:
            yield self.sample(batch_size)

    def recovery(self, W_dec_SD: Tensor) -> Tensor:
        """For each planted direction, the best cosine with any (unit-normalised) decoder row."""
        W = W_dec_SD / W_dec_SD.norm(dim=1, keepdim=True)
        return (self.directions_ND @ W.T).max(dim=1).values


def distinct_images(n: int, seed: int = 0) -> list:
    """`n` different RGB PIL images: the scikit-image photos first, then seeded coloured squares on a plain colour
    (240×180). For tests and benchmarks that need many visitors' own images."""
    import numpy as np
    from PIL import Image

    from nacosae.images import SkimageSource

    src = SkimageSource()
    images = [src.load(r) for r in src.records()][:n]
    rng = np.random.default_rng(seed)
    while len(images) < n:
        arr = np.empty((180, 240, 3), np.uint8)
        arr[:] = rng.integers(0, 256, 3)
        for _ in range(5):
            x, y, s = rng.integers(0, 200), rng.integers(0, 140), rng.integers(20, 60)
            arr[y:y + s, x:x + s] = rng.integers(0, 256, 3)
        images.append(Image.fromarray(arr))
    return images

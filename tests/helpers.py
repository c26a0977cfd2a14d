"""Small real components shared by tests (module-level so DDP spawn can pickle them)."""

from __future__ import annotations

import torch
from torch import nn


class TinyEncoder(nn.Module):
    """A two-layer MLP encoder for 8x8 images (scikit-learn digits), with a ``data_config``."""

    def __init__(self, embed_dim: int = 16, image_size: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.data_config = {"input_size": (3, image_size, image_size), "crop_pct": 1.0, "interpolation": "bilinear"}
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 32), nn.Tanh(), nn.Linear(32, embed_dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The "backbone" (timm's split, used by feature-space mixing): ``[B, 32]``."""
        return self.net[:3](x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net[3](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_batch(seed: int, n: int = 12, dim: int = 6, classes: int = 4, ref: int | None = None):
    """Float64 embeddings and labels ``(emb, labels, ref_emb, ref_labels)``; the reference set only when ``ref`` rows are asked for."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref is None:
        return emb, labels, None, None
    return emb, labels, torch.randn(ref, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (ref,), generator=g)

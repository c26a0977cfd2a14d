"""``TwoViewDataModule``: any labelled-image DataModule with two augmented views per train image (MoCo)."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision import transforms as T

from datamodules.base import MetricLearningDataModule
from datamodules.transforms import _interp, _ToChannels, resolve_data_config


class TwoViewItems(Dataset):
    """Items ``{"image": view 1, "image2": view 2, "label"}`` from a dataset whose transform is ``TwoViews``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[index])
        views = item.pop("image")
        return {"image": views[0], "image2": views[1], **item}


class TwoViews:
    """Apply one random transform twice to the same image: ``[2, C, H, W]`` (query view, key view)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: Any) -> torch.Tensor:
        return torch.stack([self.transform(img), self.transform(img)])

    def __repr__(self) -> str:
        return f"TwoViews({self.transform!r})"


def mocov2_transform(data_config: dict[str, Any] | None, scale: tuple[float, float] = (0.2, 1.0), color: bool = True) -> T.Compose:
    """MoCo v2's augmentation (Chen, Fan, Girshick, He, "Improved Baselines with Momentum Contrastive
    Learning", 2020): RandomResizedCrop (scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
    grayscale with p 0.2, Gaussian blur (sigma 0.1-2) with p 0.5, horizontal flip, normalise.
    ``color=False`` keeps only crop, flip and normalise (grayscale data)."""
    cfg = resolve_data_config(data_config)
    channels, height, width = cfg["input_size"]
    steps: list[Any] = [_ToChannels(channels), T.RandomResizedCrop((height, width), scale=scale, interpolation=_interp(cfg["interpolation"]))]
    if color:
        kernel = max(3, (int(0.1 * height) // 2) * 2 + 1)  # ~10% of the side, odd
        steps += [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
        ]
    steps += [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)


class TwoViewDataModule(L.LightningDataModule):
    """Wrap a ``MetricLearningDataModule``: train items become ``{"image", "image2", "label"}`` (two views).

    The wrapped DataModule builds its datasets and evaluation loaders as usual (retrieval metrics on
    its test set); only training changes: every image gives two MoCo v2 views, and batches are
    shuffled images (``batch_size`` per rank, a ``DistributedSampler`` under DDP, last partial batch
    dropped), as MoCo trains, not P x K.

    Args:
        datamodule: the DataModule whose data and evaluation are used.
        batch_size: images per batch and rank (MoCo: 256 in total).
        scale: the crop scale range.
        color: colour jitter, grayscale and blur (off for grayscale data).
    """

    def __init__(self, datamodule: MetricLearningDataModule, batch_size: int = 256, scale: tuple[float, float] = (0.2, 1.0), color: bool = True) -> None:
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"TwoViewDataModule: batch_size={batch_size}; expected at least 2")
        self.datamodule = datamodule
        self.batch_size = batch_size
        self.scale = tuple(scale)
        self.color = color

    # the wrapped DataModule's evaluation settings, read by MetricLearningModule
    @property
    def recall_ks(self) -> tuple[int, ...]:
        return self.datamodule.recall_ks

    @property
    def eval_protocol(self) -> str:
        return self.datamodule.eval_protocol

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup(stage)
        cfg = self.datamodule.resolved_data_config()
        self.datamodule.train_dataset.transform = TwoViews(mocov2_transform(cfg, scale=self.scale, color=self.color))

    def train_dataloader(self) -> DataLoader:
        dm = self.datamodule
        rank, world = dm._rank_world()
        sampler = DistributedSampler(dm.train_dataset, num_replicas=world, rank=rank, shuffle=True, seed=dm.seed, drop_last=True) if world > 1 else None
        generator = torch.Generator().manual_seed(dm.seed) if sampler is None else None
        return DataLoader(TwoViewItems(dm.train_dataset), batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler, generator=generator,
                          drop_last=True, **dm._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.datamodule.test_dataloader()

    def split_sizes(self) -> dict[str, dict[str, int]]:
        return self.datamodule.split_sizes()

"""``MetricLearningDataModule``: what every labelled-image benchmark shares.

A subclass only builds its datasets (``build_datasets``); this class gives them transforms from the
encoder's ``data_config``, the class-balanced P x K train sampler (DDP-aware), and sharded
evaluation loaders whose items carry their index so DDP padding can be dropped by the metrics.

Evaluation protocols (``eval_protocol``, a class attribute the LightningModule reads):

- ``"self"``: every test image is a query against all the others (CUB, Cars196, SOP); eval items
  are ``{"image", "label", "index"}``.
- ``"query_gallery"``: separate query and gallery sets (In-Shop); the subclass sets
  ``query_dataset`` and ``gallery_dataset`` and ``test_dataset`` is their ``QueryGalleryDataset``;
  eval items also hold ``"is_query"``.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from datamodules.datasets import Indexed, LabelledDataset
from datamodules.samplers import ClassBalancedBatchSampler
from datamodules.transforms import build_eval_transform, build_train_transform


class MetricLearningDataModule(L.LightningDataModule):
    """Base class for labelled-image retrieval benchmarks.

    After ``setup()`` a subclass exposes ``train_dataset`` and ``test_dataset`` (``val_dataset``
    defaults to the test set, the DML convention of evaluating on the unseen test classes), each
    yielding ``{"image", "label"}`` items and holding integer ``labels``. With the query/gallery
    protocol it also exposes ``query_dataset`` and ``gallery_dataset``.

    Args:
        classes_per_batch, samples_per_class: the P x K batch structure (per rank).
        repeat_small_classes: let a class with fewer than ``samples_per_class`` images fill its
            slots by repeating them (see ``ClassBalancedBatchSampler``) instead of failing.
        num_batches: train batches per epoch; default: one pass over the train set.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers, pin_memory, persistent_workers: DataLoader settings (pin_memory: default on
            when CUDA is available).
        seed: the sampler's global seed.
        image_size: override the encoder's input height/width (e.g. 64 for a fast CPU run).
        data_config: transform settings (input_size, mean, std, interpolation, crop_pct); by default
            taken from ``trainer.lightning_module.encoder.data_config`` at setup.
        train_scale: RandomResizedCrop scale range for training.
        augment: False trains on the evaluation transform (no random crop/flip): an ablation, and
            what makes a DDP run bit-comparable with a single-process one.
        recall_ks: the Recall@K list of the benchmark's protocol.
        verify: at setup, decode every image once and fail naming the unreadable ones (slow on
            the real benchmarks: minutes; without it a corrupt image fails when first loaded,
            with its path in the error).
        val_class_fraction: hold out this fraction of the train classes (the last ones in label
            order) as the validation set, so model selection never sees the test classes (the
            protocol of Musgrave et al., "A Metric Learning Reality Check", ECCV 2020, Sec. 3: no
            "training with test set feedback").
            0 (default): validate on the test set, the convention of most DML papers.
    """

    default_recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    eval_protocol: str = "self"

    def __init__(
        self,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        repeat_small_classes: bool = False,
        num_batches: int | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        image_size: int | None = None,
        data_config: dict[str, Any] | None = None,
        train_scale: tuple[float, float] = (0.16, 1.0),
        augment: bool = True,
        recall_ks: tuple[int, ...] | None = None,
        verify: bool = False,
        val_class_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.repeat_small_classes = repeat_small_classes
        self.num_batches = num_batches
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.image_size = image_size
        self.data_config = data_config
        self.train_scale = tuple(train_scale)
        self.augment = augment
        self.recall_ks = tuple(recall_ks) if recall_ks is not None else self.default_recall_ks
        self.verify = verify
        if not 0.0 <= val_class_fraction < 1.0:
            raise ValueError(f"val_class_fraction must be in [0, 1), got {val_class_fraction}")
        self.val_class_fraction = val_class_fraction
        self.train_dataset: LabelledDataset | None = None
        self.val_dataset: LabelledDataset | None = None
        self.test_dataset: LabelledDataset | None = None
        self.query_dataset: LabelledDataset | None = None
        self.gallery_dataset: LabelledDataset | None = None

    # -------------------------------------------------------------------------------- datasets
    def build_datasets(self) -> None:
        """Set ``self.train_dataset`` and ``self.test_dataset`` (and optionally ``self.val_dataset``)."""
        raise NotImplementedError

    def prepare_splits(self) -> None:
        """Read the metadata and build the splits (labels, paths; no transform, no image decoded unless
        ``verify``): every check of the folder. ``setup()`` calls it; the pre-flight check
        (``experiments.preflight``) calls it before training to compare the splits with the model."""
        if self.train_dataset is None:
            try:
                self.build_datasets()
                if self.val_class_fraction > 0:
                    self._hold_out_val_classes()
                if self.val_dataset is None:
                    self.val_dataset = self.test_dataset
                self._check_protocol()
                if self.verify:
                    self.verify_images()
            except BaseException:
                # A failed check leaves no half-built splits behind: the next setup() checks again.
                self.train_dataset = self.val_dataset = self.test_dataset = None
                self.query_dataset = self.gallery_dataset = None
                raise

    def setup(self, stage: str | None = None) -> None:
        self.prepare_splits()
        cfg = self.resolved_data_config()
        eval_tf = build_eval_transform(cfg)
        self.train_dataset.transform = build_train_transform(cfg, scale=self.train_scale) if self.augment else eval_tf
        for ds in {id(d): d for d in self.eval_datasets()}.values():
            ds.transform = eval_tf

    def eval_datasets(self) -> list[LabelledDataset]:
        return [d for d in (self.val_dataset, self.test_dataset) if d is not None]

    def _hold_out_val_classes(self) -> None:
        if self.val_dataset is not None or self.eval_protocol != "self":
            raise ValueError(
                f"{type(self).__name__}: val_class_fraction needs a DataModule without its own validation set "
                f"and with the 'self' evaluation protocol"
            )
        labels = np.asarray(self.train_dataset.labels)
        classes = np.unique(labels)
        n_val = max(1, round(self.val_class_fraction * len(classes)))
        if n_val >= len(classes):
            raise ValueError(f"val_class_fraction={self.val_class_fraction} leaves no train class out of {len(classes)}")
        is_val = np.isin(labels, classes[len(classes) - n_val :])
        full = self.train_dataset
        self.train_dataset, self.val_dataset = full.subset(np.flatnonzero(~is_val)), full.subset(np.flatnonzero(is_val))

    def _check_protocol(self) -> None:
        if self.eval_protocol not in ("self", "query_gallery"):
            raise ValueError(f"{type(self).__name__}.eval_protocol is {self.eval_protocol!r}; expected 'self' or 'query_gallery'")
        if self.eval_protocol == "query_gallery":
            for ds in self.eval_datasets():
                if not hasattr(ds, "is_query"):
                    raise ValueError(
                        f"{type(self).__name__} declares the query/gallery protocol but its evaluation dataset "
                        f"{type(ds).__name__} has no is_query; use datamodules.datasets.QueryGalleryDataset"
                    )

    def verify_images(self, num_threads: int = 8) -> None:
        """Decode every image of every split once; an ``OSError`` names the unreadable ones."""
        for ds in {id(d): d for d in (self.train_dataset, *self.eval_datasets())}.values():
            if hasattr(ds, "verify"):
                ds.verify(num_threads)

    def resolved_data_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        encoder = getattr(module, "encoder", None)
        if getattr(encoder, "data_config", None):
            cfg.update(encoder.data_config)
        if self.data_config:
            cfg.update(self.data_config)
        if self.image_size is not None:
            channels = cfg.get("input_size", (3,))[0]
            cfg["input_size"] = (channels, self.image_size, self.image_size)
        return cfg

    # ----------------------------------------------------------------------------- DDP context
    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # ---------------------------------------------------------------------------- dataloaders
    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.persistent_workers,
        }

    def train_sampler(self) -> ClassBalancedBatchSampler:
        rank, world = self._rank_world()
        return ClassBalancedBatchSampler(
            self.train_dataset.labels,
            self.classes_per_batch,
            self.samples_per_class,
            num_batches=self.num_batches,
            seed=self.seed,
            rank=rank,
            world_size=world,
            repeat_small_classes=self.repeat_small_classes,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_sampler=self.train_sampler(), **self._loader_kwargs())

    def eval_dataloader(self, dataset: LabelledDataset) -> DataLoader:
        """Items are ``{"image", "label", "index"}``, plus ``"is_query"`` under the query/gallery protocol;
        under DDP each rank gets a shard (padded; see ``Indexed``)."""
        rank, world = self._rank_world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        items = Indexed(dataset, with_query_flag=self.eval_protocol == "query_gallery")
        return DataLoader(items, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_dataset)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_dataset)

    # ------------------------------------------------------------------------------- summaries
    def class_name(self, label: int, dataset: LabelledDataset | None = None) -> str:
        """How the dataset itself names the class of 0-based ``label`` (for messages): the folder or id
        of its metadata (``class_names`` of the dataset, else its ``class_ids``), else the label."""
        ds = dataset if dataset is not None else self.train_dataset
        names = getattr(ds, "class_names", None)
        if names is not None and int(label) in names:
            return str(names[int(label)])
        ids = getattr(ds, "class_ids", None)
        if ids is not None:
            where = np.flatnonzero(np.asarray(ds.labels) == label)
            if len(where):
                return f"class_id {ids[where[0]]}"
        return f"label {label}"

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Images and classes per split (printed by ``hardneg data check``); ``val`` only when it
        is not the test set, ``query``/``gallery`` under the query/gallery protocol."""
        out = {}
        for name in ("train", "val", "test", "query", "gallery"):
            ds = getattr(self, f"{name}_dataset", None)
            if ds is None or (name == "val" and ds is self.test_dataset):
                continue
            out[name] = {"images": len(ds), "classes": int(len(np.unique(ds.labels)))}
        return out


def class_subset(labels: np.ndarray, classes: tuple[int, ...] | list[int], what: str) -> np.ndarray:
    """Indices of the samples whose label is in ``classes``; errors if a requested class is empty."""
    labels = np.asarray(labels)
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"{what}: classes {missing} have no samples; the data has classes {sorted(present)}")
    return np.flatnonzero(np.isin(labels, np.asarray(classes)))

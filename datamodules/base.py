"""The DataModule bases: ``RetrievalDataModule`` (any modality) and ``MetricLearningDataModule`` (images).

A subclass only builds its datasets (``build_datasets``); the base gives them their inputs from the
encoder's ``data_config`` through an input pipeline (``datamodules.inputs``: image transforms, or a
tokenizing collate function for text), an injected train batch sampler (default: the class-balanced
P x K sampler, DDP-aware), and sharded evaluation loaders whose items carry their index so DDP
padding can be dropped by the metrics. Batches are dicts of named fields.

Evaluation protocols (``eval_protocol``, a class attribute the LightningModule reads):

- ``"self"``: every test item is a query against all the others (CUB, Cars196, SOP); eval items
  are ``{"image", "label", "index"}`` (text: ``{"input_ids", "attention_mask", "label", "index"}``).
- ``"query_doc"`` (``datamodules.query_doc``) and ``"image_text"`` (``datamodules.image_text``): loaders
  ``[queries, corpus]`` and ``[images, captions(, zero_shot)]``, read by their LightningModules.
- ``"query_gallery"``: separate query and gallery sets (In-Shop); the subclass sets
  ``query_dataset`` and ``gallery_dataset`` and ``test_dataset`` is their ``QueryGalleryDataset``;
  eval items also hold ``"is_query"``.

The train batch sampler: ``batch_sampler`` is a factory called at ``train_dataloader()`` as
``batch_sampler(labels, rank=rank, world_size=world_size, seed=seed)`` returning a batch sampler
(an iterable of index lists, optionally with ``set_epoch``). From YAML it is a ``class_path`` with
``init_args`` (the rest of the constructor; its first parameter receives the labels), e.g.::

    batch_sampler:
      class_path: datamodules.samplers.ClassBalancedBatchSampler
      init_args: {classes_per_batch: 8, samples_per_class: 4}

``None`` (default): ``ClassBalancedBatchSampler`` with the DataModule's ``classes_per_batch``,
``samples_per_class``, ``num_batches`` and ``repeat_small_classes``. Every rank builds its own
sampler with its rank (Lightning must not replace it: ``use_distributed_sampler=False``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules.datasets import Indexed, LabelledDataset
from datamodules.inputs import ImageInputs, InputPipeline, default_inputs
from datamodules.samplers import BatchSamplerFactory, ClassBalancedBatchSampler


class RetrievalDataModule(L.LightningDataModule):
    """Base class of the retrieval DataModules, whatever the modality.

    After ``setup()`` a subclass exposes ``train_dataset`` and ``test_dataset`` (``val_dataset``
    defaults to the test set, the DML convention of evaluating on the unseen test classes), each
    yielding dict items and holding integer ``labels``. With the query/gallery protocol it also
    exposes ``query_dataset`` and ``gallery_dataset``.

    Args:
        classes_per_batch, samples_per_class: the P x K batch structure (per rank) of the default sampler.
        repeat_small_classes: let a class with fewer than ``samples_per_class`` items fill its
            slots by repeating them (see ``ClassBalancedBatchSampler``) instead of failing.
        num_batches: train batches per epoch of the default sampler; default: one pass over the train set.
        batch_sampler: the train batch sampler factory (see the module docstring); ``None``: P x K.
        eval_batch_size: batch size of the evaluation loaders.
        num_workers, pin_memory, persistent_workers: DataLoader settings (pin_memory: default on
            when CUDA is available).
        seed: the sampler's global seed.
        data_config: input settings updating the encoder's ``data_config`` (images: input_size,
            mean, std, interpolation, crop_pct; text: tokenizer, max_length); the encoder's is
            read from ``trainer.lightning_module.encoder.data_config`` at setup.
        inputs: the input pipeline (``datamodules.inputs``); ``None``: ``default_inputs`` (text when
            the data_config has a tokenizer, images otherwise).
        recall_ks: the Recall@K list of the benchmark's protocol.
        verify: at setup, load every item once and fail naming the unreadable ones (slow on
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
    item_noun: str = "items"  # the split-size column of ``hardneg data check``

    def __init__(
        self,
        classes_per_batch: int = 8,
        samples_per_class: int = 4,
        repeat_small_classes: bool = False,
        num_batches: int | None = None,
        batch_sampler: BatchSamplerFactory | None = None,
        eval_batch_size: int = 256,
        num_workers: int = 2,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        seed: int = 0,
        data_config: dict[str, Any] | None = None,
        inputs: InputPipeline | None = None,
        recall_ks: tuple[int, ...] | None = None,
        verify: bool = False,
        val_class_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.repeat_small_classes = repeat_small_classes
        self.num_batches = num_batches
        if batch_sampler is not None and not callable(batch_sampler):
            raise TypeError(f"batch_sampler must be a factory (callable), got {type(batch_sampler).__name__}")
        self.batch_sampler = batch_sampler
        if batch_sampler is not None:
            ignored = [f"{k}={v}" for k, v, default in (("classes_per_batch", classes_per_batch, 8), ("samples_per_class", samples_per_class, 4),
                       ("num_batches", num_batches, None), ("repeat_small_classes", repeat_small_classes, False)) if v != default]
            if ignored:
                warnings.warn(f"{type(self).__name__}: {', '.join(ignored)} configure the default P x K sampler and are ignored "
                              f"with batch_sampler set; give them in batch_sampler.init_args", stacklevel=2)
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.data_config = data_config
        self.inputs = inputs
        self.collate_fn: Callable | None = None
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
        pipeline = self.input_pipeline(cfg)
        pipeline.apply(self, cfg)
        self.collate_fn = pipeline.collate_fn(cfg)

    def input_pipeline(self, data_config: dict[str, Any] | None = None) -> InputPipeline:
        """The configured ``inputs``, else the default for this DataModule and ``data_config``."""
        if self.inputs is not None:
            return self.inputs
        return default_inputs(data_config if data_config is not None else self._raw_data_config())

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
        """Load every item (decode every image) of every split once, for datasets with ``verify``;
        an ``OSError`` names the unreadable ones."""
        for ds in {id(d): d for d in (self.train_dataset, *self.eval_datasets())}.values():
            if hasattr(ds, "verify"):
                ds.verify(num_threads)

    def _raw_data_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        encoder = getattr(module, "encoder", None)
        if getattr(encoder, "data_config", None):
            cfg.update(encoder.data_config)
        if getattr(module, "needs_text", False):  # a guide model or teacher reads the raw texts (DualEncoderModule)
            cfg.setdefault("keep_text", True)
        if self.data_config:
            cfg.update(self.data_config)
        return cfg

    def resolved_data_config(self) -> dict[str, Any]:
        """The encoder's ``data_config``, updated by this DataModule's and by its input pipeline's overrides."""
        cfg = self._raw_data_config()
        return self.input_pipeline(cfg).resolve(cfg)

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

    def train_sampler(self) -> Sampler[list[int]]:
        """This rank's train batch sampler, from the ``batch_sampler`` factory (default: P x K)."""
        rank, world = self._rank_world()
        labels = np.asarray(self.train_dataset.labels)
        if self.batch_sampler is None:
            return ClassBalancedBatchSampler(
                labels,
                self.classes_per_batch,
                self.samples_per_class,
                num_batches=self.num_batches,
                seed=self.seed,
                rank=rank,
                world_size=world,
                repeat_small_classes=self.repeat_small_classes,
            )
        return self.batch_sampler(labels, rank=rank, world_size=world, seed=self.seed)

    def pk_settings(self) -> dict[str, Any] | None:
        """The P x K structure of the train batches (``classes_per_batch``, ``samples_per_class``,
        ``repeat_small_classes``) for the pre-flight checks; ``None`` when the injected sampler is
        not a ``ClassBalancedBatchSampler`` (then its batches have no declared P x K)."""
        if self.batch_sampler is None:
            return {"classes_per_batch": self.classes_per_batch, "samples_per_class": self.samples_per_class,
                    "repeat_small_classes": self.repeat_small_classes}
        factory, keywords = self.batch_sampler, {}
        while isinstance(factory, functools.partial):  # jsonargparse's class_path factories are partials
            keywords = {**factory.keywords, **keywords}
            target = next((a for a in factory.args if isinstance(a, type)), None)
            factory = target if target is not None else factory.func
        if isinstance(factory, type) and issubclass(factory, ClassBalancedBatchSampler) and "classes_per_batch" in keywords:
            return {"classes_per_batch": keywords["classes_per_batch"], "samples_per_class": keywords.get("samples_per_class"),
                    "repeat_small_classes": bool(keywords.get("repeat_small_classes", False))}
        return None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_sampler=self.train_sampler(), collate_fn=self.collate_fn, **self._loader_kwargs())

    def eval_dataloader(self, dataset: LabelledDataset) -> DataLoader:
        """Items are ``{"image", "label", "index"}`` (text: the tokenized fields for ``"image"``), plus ``"is_query"`` under the query/gallery protocol;
        under DDP each rank gets a shard (padded; see ``Indexed``)."""
        rank, world = self._rank_world()
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False) if world > 1 else None
        items = Indexed(dataset, with_query_flag=self.eval_protocol == "query_gallery")
        return DataLoader(items, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False, collate_fn=self.collate_fn,
                          **self._loader_kwargs())

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
        """Items (``item_noun``: images, items) and classes per split (printed by ``hardneg data check``);
        ``val`` only when it is not the test set, ``query``/``gallery`` under the query/gallery protocol."""
        out = {}
        for name in ("train", "val", "test", "query", "gallery"):
            ds = getattr(self, f"{name}_dataset", None)
            if ds is None or (name == "val" and ds is self.test_dataset):
                continue
            out[name] = {self.item_noun: len(ds), "classes": int(len(np.unique(ds.labels)))}
        return out


class MetricLearningDataModule(RetrievalDataModule):
    """Base class of the labelled-image benchmarks: ``RetrievalDataModule`` with image inputs.

    Items are ``{"image", "label"}``; the transforms come from the encoder's ``data_config`` through
    ``ImageInputs(image_size, train_scale, augment)`` (unless ``inputs`` is given).

    Args:
        image_size: override the encoder's input height/width (e.g. 64 for a fast CPU run).
        train_scale: RandomResizedCrop scale range for training.
        augment: False trains on the evaluation transform (no random crop/flip): an ablation, and
            what makes a DDP run bit-comparable with a single-process one.
        **kwargs: see ``RetrievalDataModule``.
    """

    item_noun = "images"

    def __init__(
        self,
        *,
        image_size: int | None = None,
        train_scale: tuple[float, float] = (0.16, 1.0),
        augment: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = image_size
        self.train_scale = tuple(train_scale)
        self.augment = augment

    def input_pipeline(self, data_config: dict[str, Any] | None = None) -> InputPipeline:
        if self.inputs is not None:
            return self.inputs
        return ImageInputs(image_size=self.image_size, train_scale=self.train_scale, augment=self.augment)


def class_subset(labels: np.ndarray, classes: tuple[int, ...] | list[int], what: str) -> np.ndarray:
    """Indices of the samples whose label is in ``classes``; errors if a requested class is empty."""
    labels = np.asarray(labels)
    present = set(np.unique(labels).tolist())
    missing = [c for c in classes if c not in present]
    if missing:
        raise ValueError(f"{what}: classes {missing} have no samples; the data has classes {sorted(present)}")
    return np.flatnonzero(np.isin(labels, np.asarray(classes)))

"""Image-text pairs for the CLIP regime: ``ImageTextDataModule`` reads CSV/TSV files or webdataset tar shards.

Sources (by extension; one kind per split, ``source_kind``):

- **CSV/TSV** (``.csv``: comma, ``.tsv``: tab; header ``image,caption[,neg_caption][,neg_image]``),
  read by ``datamodules.caption_csv``. Training reads rows map-style (one item per row); evaluation
  merges the rows of one image into one image with several captions.
- **tar shards** in the webdataset layout (``KEY.jpg``, ``KEY.txt``, optional ``KEY.neg_caption`` and
  ``KEY.neg_image.png``), given as brace patterns (``scenes-{000000..000009}.tar``, ``{a,b}``), globs,
  or lists of them, read by ``datamodules.webdataset_shards``.

Training on shards is an ``IterableDataset`` (``ShardStream``, ``datamodules.shard_stream``) that
yields whole batches. Every rank yields exactly ``num_batches`` batches per epoch, so DDP ranks
never disagree on the number of steps: ``num_batches`` is given, or derived from the sample total
(counted from the shard headers at setup, or declared with ``num_samples``) as ``total //
(batch_size * world_size)``. How the samples are split across ranks and dataloader workers, and
how the epoch reaches them, is described in ``datamodules.shard_stream``.

A corrupt or incomplete sample (undecodable image, no image or caption member, a truncated shard)
is skipped and counted, never silently: ``skipped_samples()`` gives the count per split, and the
end of fit (``teardown``) logs it and warns when it is not zero. Evaluation shards are read into a
list at setup (evaluation sets are small) so their loaders can be sharded with an index
(``datamodules.image_text_eval``).

Batches (the contract ``CLIPModule`` reads; the tokenizer is ``data_config["tokenizer"]``, a callable
``list[str] -> LongTensor [B, L]`` as open_clip's; ``datamodules.image_text_inputs``):

- train: ``{"image": [B, 3, H, W], "text": [B, L] long, "index": [B] long}``, plus, when the data
  has negatives, ``"neg_text" [B, L]``, ``"neg_image" [B, 3, H, W]`` (when negative images exist)
  and ``"has_neg" [B] bool`` (an item without a negative gets "" and a zero image, and False).
- evaluation (``eval_protocol = "image_text"``): ``val_dataloader()``/``test_dataloader()`` return
  ``[images, captions]`` loaders, plus ``zero_shot`` when there are zero-shot classes: images
  ``{"image", "index"}`` (the row among the split's distinct images), captions ``{"text", "index",
  "image_index"}``, zero-shot ``{"image", "label", "index"}``; ``text_to_image(stage)`` maps caption
  rows to image rows. Each loader is sharded across DDP ranks (padded; the index drops duplicates).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from datamodules.base import RetrievalDataModule
from datamodules.caption_csv import CSV_SUFFIXES, CaptionPairDataset, CaptionTable, read_caption_csv
from datamodules.fashion_mnist import DEBIAN_ROOT
from datamodules.image_text_eval import ImageTextEvalSet, ZeroShotImages, fashion_mnist_zero_shot, read_zero_shot_csv
from datamodules.image_text_inputs import ImageTextInputs
from datamodules.inputs import InputPipeline
from datamodules.samplers import RandomBatchSampler
from datamodules.shard_stream import ShardStream, SkipCounter, stream_loader
from datamodules.webdataset_shards import ShardScan, expand_shards, scan_shards

log = logging.getLogger(__name__)


def source_kind(spec: str | Sequence[str], what: str) -> str:
    """``"csv"`` when every entry ends with .csv/.tsv, ``"shards"`` when none does; a mix is an error."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise ValueError(f"{what}: no source given; expected a CSV/TSV path or tar shard pattern(s)")
    is_csv = [Path(str(s)).suffix.lower() in CSV_SUFFIXES for s in specs]
    if all(is_csv):
        return "csv"
    if not any(is_csv):
        return "shards"
    raise ValueError(f"{what}: {specs} mixes CSV/TSV files and tar shards; give one kind per split")


class ImageTextDataModule(RetrievalDataModule):
    """Image-caption pairs from CSV/TSV files or webdataset tar shards (see the module docstring).

    Args:
        train: a CSV/TSV path, a shard pattern, or a list of either kind.
        val, test: the evaluation splits, same forms (read map-style at setup); ``val=None``
            validates on the test split.
        image_root: the folder CSV image paths are relative to (default: each CSV's folder).
        batch_size: train items per batch per rank.
        num_batches: train batches per epoch per rank (shards and CSV); default: the sample total
            (CSV rows; shards: counted from their headers at setup, or ``num_samples``) divided by
            the global batch ``batch_size * world_size``, at least 1.
        num_samples: declare the shard sample total instead of counting it (large remote corpora).
        shuffle_buffer: samples per dataloader worker held to shuffle a shard stream.
        zero_shot: ``"fashion_mnist"`` (the Fashion-MNIST test images and class names, offline) or
            a CSV/TSV ``image,label`` path with ``class_names``; ``None``: no zero-shot loader.
        class_names: the zero-shot class names (a CSV's labels index them).
        zero_shot_templates: prompts, ``{}`` the class name (default: "a photo of a {}." ...).
        zero_shot_size: Fashion-MNIST zero-shot images (a class-stratified subset; ``None``: all).
        fashion_mnist_root: the Fashion-MNIST idx folder (zero-shot ``"fashion_mnist"``).
        image_size, train_scale, augment: see ``ImageTextInputs``.
        **kwargs: see ``RetrievalDataModule`` (``eval_batch_size``, ``num_workers``, ``seed``,
            ``data_config``, ``recall_ks``, ``verify``; ``batch_sampler`` replaces the shuffled
            batches of a CSV train set: its labels are the distinct-image ids).
    """

    eval_protocol = "image_text"
    item_noun = "images"
    default_recall_ks = (1, 5, 10)

    def __init__(
        self,
        train: str | list[str],
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        image_root: str | None = None,
        batch_size: int = 64,
        num_batches: int | None = None,
        num_samples: int | None = None,
        shuffle_buffer: int = 1000,
        zero_shot: str | None = None,
        class_names: list[str] | None = None,
        zero_shot_templates: list[str] | None = None,
        zero_shot_size: int | None = 1000,
        fashion_mnist_root: str = DEBIAN_ROOT,
        image_size: int | None = None,
        train_scale: tuple[float, float] = (0.9, 1.0),
        augment: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(num_batches=num_batches, **kwargs)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train, self.val, self.test = train, val, test
        self.train_kind = source_kind(train, "train")
        for name, spec in (("val", val), ("test", test)):
            if spec is not None:
                source_kind(spec, name)
        self.image_root, self.batch_size, self.num_samples, self.shuffle_buffer = image_root, batch_size, num_samples, shuffle_buffer
        self.image_size, self.train_scale, self.augment = image_size, tuple(train_scale), augment
        self.zero_shot, self.zero_shot_size, self.fashion_mnist_root = zero_shot, zero_shot_size, fashion_mnist_root
        if zero_shot == "fashion_mnist":
            from datamodules.fashion_scenes import CLASS_NAMES, ZERO_SHOT_TEMPLATES

            self.zero_shot_classes: list[str] | None = list(class_names) if class_names is not None else list(CLASS_NAMES)
            default_templates = list(ZERO_SHOT_TEMPLATES)
        elif zero_shot is not None:
            if not class_names:
                raise ValueError(f"zero_shot={zero_shot!r} (a CSV) needs class_names: the names its labels index")
            self.zero_shot_classes, default_templates = list(class_names), ["a photo of a {}."]
        else:
            self.zero_shot_classes, default_templates = None, ["a photo of a {}."]
        self.zero_shot_templates: list[str] = list(zero_shot_templates) if zero_shot_templates is not None else default_templates
        bad = [t for t in self.zero_shot_templates if "{}" not in t]
        if bad:
            raise ValueError(f"zero_shot_templates {bad} lack the '{{}}' where the class name goes")
        self.zero_shot_dataset: ZeroShotImages | None = None
        self.train_scan: ShardScan | None = None
        self.train_shards: list[str] | None = None
        self._train_skipped = SkipCounter()

    # -------------------------------------------------------------------------------- datasets
    def build_datasets(self) -> None:
        if self.train_kind == "csv":
            table = CaptionTable()
            for path in [self.train] if isinstance(self.train, (str, Path)) else self.train:
                table.extend(read_caption_csv(path, self.image_root))
            self.train_dataset = CaptionPairDataset(table)
        else:
            self.train_shards = expand_shards(self.train, "train")
            self.train_scan = scan_shards(self.train_shards) if self.num_samples is None else scan_shards(self.train_shards[:1])
            total = self.num_samples if self.num_samples is not None else self.train_scan.samples
            if total < 1:
                raise ValueError(f"train shards {self.train_shards[:3]}... hold no complete sample (image + .txt); "
                                 f"{self.train_scan.incomplete} incomplete")
            # Placeholder until train_dataloader() knows the rank: setup() needs a dataset to give its transform.
            self.train_dataset = self._make_stream(0, 1)
        self.test_dataset = self._read_eval(self.test, "test") if self.test is not None else None
        self.val_dataset = self._read_eval(self.val, "val") if self.val is not None else None
        if self.zero_shot == "fashion_mnist":
            self.zero_shot_dataset = fashion_mnist_zero_shot(self.fashion_mnist_root, self.zero_shot_size, self.seed)
        elif self.zero_shot is not None:
            self.zero_shot_dataset = read_zero_shot_csv(self.zero_shot, self.zero_shot_classes, self.image_root)

    def _read_eval(self, spec: str | list[str], name: str) -> ImageTextEvalSet:
        if source_kind(spec, name) == "csv":
            table = CaptionTable()
            for path in [spec] if isinstance(spec, (str, Path)) else spec:
                table.extend(read_caption_csv(path, self.image_root))
            return ImageTextEvalSet.from_table(table, name)
        return ImageTextEvalSet.from_shards(expand_shards(spec, name), name)

    def _check_protocol(self) -> None:
        if self.eval_protocol != "image_text":
            raise ValueError(f"{type(self).__name__}.eval_protocol is {self.eval_protocol!r}; expected 'image_text'")

    def prepare_splits(self) -> None:
        if self.train_dataset is None:
            self.zero_shot_dataset = None
        super().prepare_splits()

    def input_pipeline(self, data_config: dict[str, Any] | None = None) -> InputPipeline:
        if self.inputs is not None:
            return self.inputs
        return ImageTextInputs(image_size=self.image_size, train_scale=self.train_scale, augment=self.augment)

    def eval_datasets(self) -> list[Dataset]:
        """The datasets that take the evaluation transform: every evaluation split's images, the zero-shot images."""
        out: list[Dataset] = [s.images for s in (self.val_dataset, self.test_dataset) if s is not None]
        return out + ([self.zero_shot_dataset] if self.zero_shot_dataset is not None else [])

    def verify_images(self, num_threads: int = 8) -> None:
        """``verify=True``: decode every CSV image (an ``OSError`` names the unreadable ones); shard samples
        are decoded when read (evaluation: at setup; training: corrupt ones are skipped and counted)."""
        if hasattr(self.train_dataset, "verify"):
            self.train_dataset.verify(num_threads)
        for split in {id(s): s for s in (self.val_dataset, self.test_dataset) if s is not None}.values():
            for i in range(len(split.images)):
                split.images[i]

    def pk_settings(self) -> dict[str, Any] | None:
        return None  # image-text batches are not P x K

    # ------------------------------------------------------------------------------ train data
    def _make_stream(self, rank: int, world: int) -> ShardStream:
        total = self.num_samples if self.num_samples is not None else self.train_scan.samples
        num_batches = self.num_batches if self.num_batches is not None else max(1, total // (self.batch_size * world))
        return ShardStream(
            self.train_shards, self.batch_size, num_batches, rank=rank, world_size=world, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
            with_neg_text=self.train_scan.with_neg_text > 0, with_neg_image=self.train_scan.with_neg_image > 0,
            transform=getattr(self.train_dataset, "transform", None), skipped=self._train_skipped,
            shard_sizes=self.train_scan.raw_per_shard if self.num_samples is None else None,
        )

    def train_sampler(self) -> Sampler[list[int]]:
        """The batch sampler of a CSV train set: shuffled batches (``datamodules.samplers.RandomBatchSampler``:
        a per-epoch permutation cut into global batches, rank ``r`` the ``r``-th slice), or the ``batch_sampler`` factory's."""
        rank, world = self._rank_world()
        if self.batch_sampler is not None:
            return self.batch_sampler(self.train_dataset.labels, rank=rank, world_size=world, seed=self.seed)
        return RandomBatchSampler(len(self.train_dataset), self.batch_size, rank=rank, world_size=world, seed=self.seed, num_batches=self.num_batches)

    def train_dataloader(self) -> DataLoader:
        if self.train_kind == "csv":
            return DataLoader(self.train_dataset, batch_sampler=self.train_sampler(), collate_fn=self.collate_fn, **self._loader_kwargs())
        rank, world = self._rank_world()
        self.train_dataset = self._make_stream(rank, world)
        return stream_loader(self.train_dataset, self.collate_fn, **self._loader_kwargs())

    # ----------------------------------------------------------------------------- evaluation
    def _eval_split(self, stage: str) -> ImageTextEvalSet:
        split = self.test_dataset if stage == "test" else (self.val_dataset or self.test_dataset)
        if split is None:
            raise ValueError(f"{type(self).__name__}: no evaluation data for stage {stage!r}; give test= (and optionally val=)")
        return split

    def eval_loaders(self, stage: str) -> list[DataLoader]:
        """``[images, captions]`` (+ ``zero_shot``) loaders of the split of ``stage``."""
        split = self._eval_split(stage)
        loaders = [self.eval_dataloader(split.images), self.eval_dataloader(split.captions)]
        if self.zero_shot_dataset is not None:
            loaders.append(self.eval_dataloader(self.zero_shot_dataset))
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders("validate") if (self.val_dataset or self.test_dataset) is not None else []

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders("test")

    def text_to_image(self, stage: str) -> torch.Tensor:
        """``[T]`` long: the image row of every caption row of the split of ``stage`` ("validate"/"val" or "test")."""
        return torch.as_tensor(self._eval_split(stage).text_to_image, dtype=torch.long)

    # ------------------------------------------------------------------------------- reporting
    def skipped_samples(self) -> dict[str, int]:
        """Samples skipped per split: ``train`` counts every skipped read of a shard sample during training on
        this rank (a corrupt sample read in two passes counts twice; a CSV train set never skips: an
        unreadable file raises naming it); ``val``/``test`` the shard samples dropped at setup."""
        out = {"train": self._train_skipped.total()}
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is not None and not (name == "val" and split is self.test_dataset):
                out[name] = split.skipped
        return out

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            counts = self.skipped_samples()
            rank = self._rank_world()[0]
            message = f"{type(self).__name__} (rank {rank}): skipped samples per split: {counts}"
            if any(counts.values()):
                warnings.warn(message + " (corrupt or incomplete; see the DEBUG logs of datamodules.shard_stream and datamodules.image_text_eval for which)", stacklevel=2)
                log.warning(message)
            else:
                log.info(message)

    def split_sizes(self) -> dict[str, dict[str, int]]:
        """Images and captions per split (train shards: complete samples counted from the headers)."""
        out: dict[str, dict[str, int]] = {}
        if isinstance(self.train_dataset, CaptionPairDataset):
            out["train"] = {"images": int(len(np.unique(self.train_dataset.labels))), "captions": len(self.train_dataset)}
        elif self.train_scan is not None:
            n = self.num_samples if self.num_samples is not None else self.train_scan.samples
            out["train"] = {"images": int(n), "captions": int(n)}
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is not None and not (name == "val" and split is self.test_dataset):
                out[name] = {"images": len(split.images), "captions": len(split.captions)}
        if self.zero_shot_dataset is not None:
            out["zero_shot"] = {"images": len(self.zero_shot_dataset), "classes": len(self.zero_shot_classes)}
        return out

    def data_summary(self) -> str:
        """What ``hardneg data check`` prints beyond the split sizes: captions per image, negatives, skipped samples."""
        lines = []
        if isinstance(self.train_dataset, CaptionPairDataset):
            t = self.train_dataset.table
            lines.append(f"train: {len(t)} pairs from CSV, negatives: {sum(c is not None for c in t.neg_captions)} captions, "
                         f"{sum(p is not None for p in t.neg_images)} images")
        elif self.train_scan is not None:
            s = self.train_scan
            counted = "declared" if self.num_samples is not None else "counted"
            lines.append(f"train: {len(self.train_shards)} shards, {self.num_samples or s.samples} samples ({counted}), "
                         f"{s.incomplete} incomplete (no image or caption){' in the first shard' if self.num_samples else ''}, "
                         f"negatives: {s.with_neg_text} captions, {s.with_neg_image} images")
        for name in ("val", "test"):
            split = getattr(self, f"{name}_dataset")
            if split is None or (name == "val" and split is self.test_dataset):
                continue
            per = np.bincount(split.text_to_image, minlength=len(split.images))
            negs = sum(n is not None for n in split.neg_captions) if split.neg_captions is not None else 0
            lines.append(f"{name}: {len(split.images)} images, {len(split.captions)} captions ({per.min()}-{per.max()} per image, "
                         f"mean {per.mean():.2f}), negatives: {negs} captions, skipped: {split.skipped}")
        if self.zero_shot_classes is not None:
            lines.append(f"zero-shot: {len(self.zero_shot_classes)} classes, templates {self.zero_shot_templates}")
        return "\n".join(lines)

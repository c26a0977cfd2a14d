"""The input pipeline of the CLIP regime: image transforms from the encoder's ``data_config`` and a tokenizing collate.

The tokenizer is ``data_config["tokenizer"]``, a callable ``list[str] -> LongTensor [B, L]`` as
open_clip's; ``text`` and ``neg_text`` are tokenized as one batch each and the rest is
default-collated, which gives the batch contract of ``datamodules.image_text``. Train images are
cropped without a horizontal flip, which would contradict "to the left of" captions.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import default_collate

from datamodules.inputs import ImageInputs


class ImageTextCollate:
    """Collate image-text items: ``text``/``neg_text`` tokenized as one batch each with ``tokenizer``
    (``list[str] -> LongTensor [B, L]``), the rest default-collated."""

    text_fields = ("text", "neg_text")

    def __init__(self, tokenizer: Callable[[list[str]], torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        out = self.tokenizer(texts)
        if isinstance(out, Mapping):
            raise TypeError(f"image-text tokenizer {self.tokenizer!r} returned a mapping ({sorted(out)}); the CLIP contract is a callable "
                            f"list[str] -> LongTensor [B, L] (open_clip's tokenizer), e.g. lambda t: hf(t, ...)['input_ids']")
        out = torch.as_tensor(out)
        if out.ndim != 2 or out.shape[0] != len(texts):
            raise ValueError(f"image-text tokenizer {self.tokenizer!r} returned shape {tuple(out.shape)} for {len(texts)} texts; expected [B, L]")
        return out.long()

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in self.text_fields:
            if key in items[0]:
                batch[key] = self.tokenize([item[key] for item in items])
        rest = [{k: v for k, v in item.items() if k not in self.text_fields} for item in items]
        batch.update(default_collate(rest))
        if "has_neg" in batch:
            batch["has_neg"] = batch["has_neg"].bool()
        return batch


class ImageTextInputs(ImageInputs):
    """Image transforms from ``data_config`` and a tokenizing collate (the CLIP regime).

    Train images: RandomResizedCrop over ``train_scale`` without horizontal flip (a flip would
    contradict "to the left of" captions); eval: resize + centre crop.

    Args:
        image_size: override the encoder's input height/width.
        train_scale: RandomResizedCrop scale range (open_clip's default ``(0.9, 1.0)``).
        augment: False trains on the evaluation transform.
    """

    def __init__(self, image_size: int | None = None, train_scale: tuple[float, float] = (0.9, 1.0), augment: bool = True) -> None:
        super().__init__(image_size, train_scale, augment)

    def apply(self, datamodule: Any, data_config: dict[str, Any]) -> None:
        from datamodules.transforms import build_eval_transform, build_train_transform

        eval_tf = build_eval_transform(data_config)
        if datamodule.train_dataset is not None:
            datamodule.train_dataset.transform = build_train_transform(data_config, scale=self.train_scale, hflip=0.0) if self.augment else eval_tf
        for ds in {id(d): d for d in datamodule.eval_datasets()}.values():
            ds.transform = eval_tf

    def collate_fn(self, data_config: dict[str, Any]) -> Callable:
        tokenizer = data_config.get("tokenizer")
        if tokenizer is None or not callable(tokenizer) or isinstance(tokenizer, str):
            raise ValueError(
                f"ImageTextInputs: data_config tokenizer is {tokenizer!r}; the CLIP regime needs a callable list[str] -> LongTensor [B, L] "
                f"(OpenCLIPEncoder's data_config has one), or set data.init_args.data_config.tokenizer"
            )
        return ImageTextCollate(tokenizer)

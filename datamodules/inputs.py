"""How raw items become encoder inputs, built from the encoder's ``data_config``.

A DataModule does not know whether its encoder reads pixels or tokens: at ``setup()`` it resolves the
``data_config`` (the encoder's, updated by the DataModule's own ``data_config``) and hands it to its
input pipeline, which sets the datasets' transforms and/or returns the loaders' collate function:

- ``ImageInputs``: per-item transforms from ``input_size, mean, std, interpolation, crop_pct``
  (train: RandomResizedCrop + flip; eval: resize + centre crop); the default collate stacks
  ``{"image", "label", ...}``.
- ``TextInputs``: items keep their raw strings; the collate function tokenizes a batch at once with
  ``data_config["tokenizer"]`` (an HF tokenizer, an HF name or local path, or any callable) and
  ``max_length``: ``{"text": str, "label": int}`` items become ``{"input_ids", "attention_mask",
  ..., "label"}`` batches.

A new modality is one more class with ``apply(datamodule, data_config)`` and ``collate_fn(data_config)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import default_collate


class InputPipeline:
    """Base of the input pipelines: ``apply`` sets per-item transforms, ``collate_fn`` builds batches."""

    def apply(self, datamodule: Any, data_config: dict[str, Any]) -> None:
        """Set the transforms of ``datamodule.train_dataset`` and of its evaluation datasets."""

    def collate_fn(self, data_config: dict[str, Any]) -> Callable | None:
        """The loaders' ``collate_fn`` (``None``: torch's default collate)."""
        return None

    def resolve(self, data_config: dict[str, Any]) -> dict[str, Any]:
        """The DataModule's final ``data_config`` (overrides of this pipeline applied)."""
        return data_config


class ImageInputs(InputPipeline):
    """Image transforms from ``data_config`` (the labelled-image benchmarks).

    Args:
        image_size: override the encoder's input height/width (e.g. 64 for a fast CPU run).
        train_scale: RandomResizedCrop scale range for training.
        augment: False trains on the evaluation transform (no random crop/flip).
    """

    def __init__(self, image_size: int | None = None, train_scale: tuple[float, float] = (0.16, 1.0), augment: bool = True) -> None:
        self.image_size = image_size
        self.train_scale = tuple(train_scale)
        self.augment = augment

    def resolve(self, data_config: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(data_config)
        if self.image_size is not None:
            channels = cfg.get("input_size", (3,))[0]
            cfg["input_size"] = (channels, self.image_size, self.image_size)
        return cfg

    def apply(self, datamodule: Any, data_config: dict[str, Any]) -> None:
        from datamodules.transforms import build_eval_transform, build_train_transform

        eval_tf = build_eval_transform(data_config)
        datamodule.train_dataset.transform = build_train_transform(data_config, scale=self.train_scale) if self.augment else eval_tf
        for ds in {id(d): d for d in datamodule.eval_datasets()}.values():
            ds.transform = eval_tf

    def __repr__(self) -> str:
        return f"ImageInputs(image_size={self.image_size}, train_scale={self.train_scale}, augment={self.augment})"


class TextInputs(InputPipeline):
    """Tokenize batches of text items with ``data_config["tokenizer"]``.

    Args:
        max_length: tokens per text (default: ``data_config["max_length"]``, else 128).
        text_fields: item key -> prefix of its tokenized fields in the batch: ``{"text": ""}`` gives
            ``input_ids``/``attention_mask``; ``{"query": "query_", "doc": "doc_"}`` gives
            ``query_input_ids``, ``doc_attention_mask`` ...
    """

    def __init__(self, max_length: int | None = None, text_fields: dict[str, str] | None = None) -> None:
        self.max_length = max_length
        self.text_fields = dict(text_fields) if text_fields is not None else {"text": ""}

    def resolve(self, data_config: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(data_config)
        if self.max_length is not None:
            cfg["max_length"] = self.max_length
        cfg.setdefault("max_length", 128)
        return cfg

    def collate_fn(self, data_config: dict[str, Any]) -> Callable:
        tokenizer = data_config.get("tokenizer")
        if tokenizer is None:
            raise ValueError(
                "TextInputs: data_config has no 'tokenizer'; give the encoder a data_config with one "
                "(HFTextEncoder does) or set data.init_args.data_config.tokenizer (a callable, or an HF name or local path)"
            )
        return TokenizeCollate(load_tokenizer(tokenizer), int(data_config["max_length"]), self.text_fields)

    def __repr__(self) -> str:
        return f"TextInputs(max_length={self.max_length}, text_fields={self.text_fields})"


def load_tokenizer(tokenizer: Any) -> Callable:
    """A tokenizer object as given, or an HF tokenizer loaded from a name or local path (a string)."""
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer)
    if not callable(tokenizer):
        raise TypeError(f"data_config tokenizer must be callable or an HF name/path, got {type(tokenizer).__name__}")
    return tokenizer


def is_hf_tokenizer(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "model_input_names") and hasattr(tokenizer, "pad_token_id")


class TokenizeCollate:
    """Collate ``{"text": str, ...}`` items: the text fields tokenized as one batch, the rest default-collated.

    The tokenizer is called as an HF tokenizer (``padding=True, truncation=True, max_length=...,
    return_tensors="pt"``) when it is one, else as ``tokenizer(texts, max_length=max_length)``,
    which must return a mapping with ``input_ids`` and ``attention_mask`` (tensors or nested lists,
    ``[B, L]``).
    """

    def __init__(self, tokenizer: Callable, max_length: int, text_fields: Mapping[str, str]) -> None:
        self.tokenizer, self.max_length, self.text_fields = tokenizer, max_length, dict(text_fields)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if is_hf_tokenizer(self.tokenizer):
            out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        else:
            out = self.tokenizer(list(texts), max_length=self.max_length)
        if not isinstance(out, Mapping) or "input_ids" not in out or "attention_mask" not in out:
            raise ValueError(f"tokenizer {self.tokenizer!r} must return a mapping with input_ids and attention_mask, got {type(out).__name__}")
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in out.items()}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [k for k in self.text_fields if k not in items[0]]
        if missing:
            raise KeyError(f"text items lack the field(s) {missing} (TextInputs text_fields); item keys: {sorted(items[0])}")
        batch: dict[str, Any] = {}
        for key, prefix in self.text_fields.items():
            for name, value in self.tokenize([item[key] for item in items]).items():
                batch[prefix + name] = value
        rest = [{k: v for k, v in item.items() if k not in self.text_fields} for item in items]
        if rest[0]:
            batch.update(default_collate(rest))
        return batch


def default_inputs(data_config: dict[str, Any]) -> InputPipeline:
    """The pipeline a ``data_config`` implies: text when it has a tokenizer, images otherwise."""
    return TextInputs() if data_config.get("tokenizer") is not None else ImageInputs()

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
  ..., "label"}`` batches. A text field may hold a list of strings per item (a query's hard
  negatives): the lists are flattened query-major into one tokenized block. A field's role
  (``"query"``, ``"doc"``) prepends ``data_config["query_prefix"]`` / ``["doc_prefix"]`` (E5's
  ``"query: "`` / ``"passage: "``), and the query role's fields are truncated at
  ``data_config["query_max_length"]`` when it is there (Tevatron's ``q_max_len``; the encoder's
  ``HFTextEncoder(query_max_length=...)``), every other field at ``max_length``: each field is
  tokenized on its own, so a batch's query block pads to its longest query and its document block
  to its longest document. Integer-list fields (``pos_idx``) become ``[B, P]`` tensors
  padded with -1. With ``keep_text`` (``TextInputs(keep_text=True)`` or ``data_config["keep_text"]``)
  the batch also holds each text field's raw strings, without the role prefix, under the field's
  prefix + ``"text"`` (``query_text: list[str] [B]``, ``doc_text``, ``neg_text [B*k]`` flattened
  query-major like ``neg_input_ids``): what a component with another tokenizer reads (a GISTEmbed
  guide, a cross-encoder teacher: ``DualEncoderModule.needs_text``).

A new modality is one more class with ``apply(datamodule, data_config)`` and ``collate_fn(data_config)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from contracts.arguments import is_int_at_least


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
        return f"{type(self).__name__}(image_size={self.image_size}, train_scale={self.train_scale}, augment={self.augment})"


class TextInputs(InputPipeline):
    """Tokenize batches of text items with ``data_config["tokenizer"]``.

    Args:
        max_length: tokens per text (default: ``data_config["max_length"]``, else 128).
        query_max_length: tokens per text of the fields whose role is ``"query"`` (default:
            ``data_config["query_max_length"]``; absent: ``max_length``, one length for every field).
        text_fields: item key -> prefix of its tokenized fields in the batch: ``{"text": ""}`` gives
            ``input_ids``/``attention_mask``; ``{"query": "query_", "doc": "doc_"}`` gives
            ``query_input_ids``, ``doc_attention_mask`` ... A field holding ``list[str]`` per item
            (``{"negs": "neg_"}``) gives ``neg_input_ids [sum of the list lengths, L]``, item-major
            (rows ``i*k .. i*k+k-1`` are item ``i``'s when every list has ``k``); no ``neg_*`` keys
            when every list is empty.
        roles: item key -> role (``"query"`` or ``"doc"``): the text is prefixed with
            ``data_config[f"{role}_prefix"]`` (absent or ``None``: no prefix), e.g.
            ``{"query": "query", "doc": "doc", "negs": "doc"}``. A field without a role gets no prefix.
        keep_text: also put each text field's raw strings (without the role prefix) in the batch, under
            the field's prefix + ``"text"`` (``{"query": "query_"}`` -> ``query_text: list[str]``; a list
            field flattened item-major). ``data_config["keep_text"] = True`` turns it on as well, so a
            component that reads raw texts can ask for them through the DataModule's ``data_config``.
    """

    def __init__(
        self,
        max_length: int | None = None,
        text_fields: dict[str, str] | None = None,
        roles: dict[str, str] | None = None,
        keep_text: bool = False,
        query_max_length: int | None = None,
    ) -> None:
        for name, value in (("max_length", max_length), ("query_max_length", query_max_length)):
            if value is not None and not is_int_at_least(value, 1):
                raise ValueError(f"TextInputs {name} must be a positive int or None (the data_config's), got {value!r}")
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.keep_text = bool(keep_text)
        self.text_fields = dict(text_fields) if text_fields is not None else {"text": ""}
        self.roles = dict(roles) if roles is not None else {}
        unknown = sorted(set(self.roles) - set(self.text_fields))
        if unknown:
            raise ValueError(f"TextInputs: roles name field(s) {unknown} that are not text_fields {sorted(self.text_fields)}")

    def resolve(self, data_config: dict[str, Any]) -> dict[str, Any]:
        cfg = dict(data_config)
        if self.max_length is not None:
            cfg["max_length"] = self.max_length
        if self.query_max_length is not None:
            cfg["query_max_length"] = self.query_max_length
        cfg.setdefault("max_length", 128)
        return cfg

    def lengths(self, data_config: dict[str, Any]) -> dict[str, int]:
        """Text field -> its token limit where it differs from ``max_length``: the query role's fields
        at ``data_config["query_max_length"]`` (none when that is absent or ``None``)."""
        query_length = data_config.get("query_max_length")
        if query_length is None:
            return {}
        if not is_int_at_least(query_length, 1):
            raise ValueError(f"data_config query_max_length must be a positive int or None, got {query_length!r}")
        return {field: query_length for field, role in self.roles.items() if role == "query"}

    def prefixes(self, data_config: dict[str, Any]) -> dict[str, str]:
        """Text field -> the string prepended to its texts (from its role's ``data_config`` prefix)."""
        out = {}
        for field, role in self.roles.items():
            prefix = data_config.get(f"{role}_prefix")
            if prefix is not None and not isinstance(prefix, str):
                raise TypeError(f"data_config {role}_prefix must be a string, got {type(prefix).__name__}")
            if prefix:
                out[field] = prefix
        return out

    def collate_fn(self, data_config: dict[str, Any]) -> Callable:
        tokenizer = data_config.get("tokenizer")
        if tokenizer is None:
            raise ValueError(
                "TextInputs: data_config has no 'tokenizer'; give the encoder a data_config with one "
                "(HFTextEncoder does) or set data.init_args.data_config.tokenizer (a callable, or an HF name or local path)"
            )
        keep_text = self.keep_text or bool(data_config.get("keep_text", False))
        return TokenizeCollate(load_tokenizer(tokenizer), int(data_config["max_length"]), self.text_fields, self.prefixes(data_config), keep_text,
                               self.lengths(data_config))

    def __repr__(self) -> str:
        query = f", query_max_length={self.query_max_length}" if self.query_max_length is not None else ""
        roles = f", roles={self.roles}" if self.roles else ""
        keep = ", keep_text=True" if self.keep_text else ""
        return f"TextInputs(max_length={self.max_length}{query}, text_fields={self.text_fields}{roles}{keep})"


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
    """Collate ``{"text": str, ...}`` items: the text fields tokenized as one batch, the rest collated.

    The tokenizer is called as an HF tokenizer (``padding=True, truncation=True, max_length=...,
    return_tensors="pt"``) when it is one, else as ``tokenizer(texts, max_length=max_length)``,
    which must return a mapping with ``input_ids`` and ``attention_mask`` (tensors or nested lists,
    ``[B, L]``). A text field holding lists of strings is flattened item-major into one block.
    ``prefixes`` (field -> string) are prepended to that field's texts. Other fields: lists of ints
    become a ``[B, max list length]`` long tensor padded with -1; the rest is default-collated.
    ``keep_text``: each text field's raw strings (before the prefix) also go in the batch as a
    ``list[str]`` under the field's prefix + ``"text"``. ``lengths`` (field -> int) truncates those
    fields at their own length instead of ``max_length`` (the queries' ``query_max_length``).
    """

    def __init__(
        self,
        tokenizer: Callable,
        max_length: int,
        text_fields: Mapping[str, str],
        prefixes: Mapping[str, str] | None = None,
        keep_text: bool = False,
        lengths: Mapping[str, int] | None = None,
    ) -> None:
        self.tokenizer, self.max_length, self.text_fields = tokenizer, max_length, dict(text_fields)
        self.prefixes = dict(prefixes or {})
        self.keep_text = bool(keep_text)
        self.lengths = dict(lengths or {})
        unknown = sorted(set(self.lengths) - set(self.text_fields))
        if unknown:
            raise ValueError(f"TokenizeCollate: lengths name field(s) {unknown} that are not text_fields {sorted(self.text_fields)}")

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """``texts`` tokenized as one batch, truncated at ``max_length`` (``None``: ``self.max_length``)."""
        length = self.max_length if max_length is None else max_length
        if is_hf_tokenizer(self.tokenizer):
            out = self.tokenizer(list(texts), padding=True, truncation=True, max_length=length, return_tensors="pt")
        else:
            out = self.tokenizer(list(texts), max_length=length)
        if not isinstance(out, Mapping) or "input_ids" not in out or "attention_mask" not in out:
            raise ValueError(f"tokenizer {self.tokenizer!r} must return a mapping with input_ids and attention_mask, got {type(out).__name__}")
        return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in out.items()}

    def field_texts(self, key: str, items: list[dict[str, Any]], prefixed: bool = True) -> list[str]:
        """The texts of field ``key`` of a batch, lists flattened item-major, with the field's prefix
        (``prefixed=False``: the raw strings)."""
        values = [item[key] for item in items]
        if all(isinstance(v, str) for v in values):
            texts = values
        elif all(isinstance(v, (list, tuple)) for v in values):
            texts = [t for v in values for t in v]
            bad = next((t for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise TypeError(f"text field {key!r} holds a list with a {type(bad).__name__} ({bad!r}); expected strings")
        else:
            kinds = sorted({type(v).__name__ for v in values})
            raise TypeError(f"text field {key!r} must hold a str or a list of str in every item of a batch, got {kinds}")
        prefix = self.prefixes.get(key, "") if prefixed else ""
        return [prefix + t for t in texts] if prefix else list(texts)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        missing = [k for k in self.text_fields if k not in items[0]]
        if missing:
            raise KeyError(f"text items lack the field(s) {missing} (TextInputs text_fields); item keys: {sorted(items[0])}")
        batch: dict[str, Any] = {}
        for key, prefix in self.text_fields.items():
            texts = self.field_texts(key, items)
            if not texts:  # every item's list is empty (no hard negatives): no tokenized block
                continue
            for name, value in self.tokenize(texts, self.lengths.get(key)).items():
                batch[prefix + name] = value
            if self.keep_text:
                batch[prefix + "text"] = self.field_texts(key, items, prefixed=False)
        for key in items[0]:
            if key not in self.text_fields:
                batch[key] = collate_field([item[key] for item in items])
        return batch


def collate_field(values: list[Any]) -> Any:
    """One non-text field of a batch: lists of ints -> ``[B, P]`` long, padded with -1; the rest default-collated."""
    if all(isinstance(v, (list, tuple)) for v in values) and all(isinstance(x, (int, np.integer)) for v in values for x in v):
        width = max((len(v) for v in values), default=0)
        out = torch.full((len(values), width), -1, dtype=torch.long)
        for row, v in enumerate(values):
            if len(v):
                out[row, : len(v)] = torch.as_tensor(v, dtype=torch.long)
        return out
    return default_collate(values)


def default_inputs(data_config: dict[str, Any]) -> InputPipeline:
    """The pipeline a ``data_config`` implies: text when it has a tokenizer, images otherwise."""
    return TextInputs() if data_config.get("tokenizer") is not None else ImageInputs()

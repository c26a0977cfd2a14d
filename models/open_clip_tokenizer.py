"""``OpenCLIPTokenizer``: open_clip's tokenizer for a model as a picklable ``list[str] -> LongTensor [B, L]``.

``OpenCLIPEncoder.data_config["tokenizer"]`` is one of these: the DataModule's collate calls it in
DataLoader workers, so it stores only the recipe (HF tokenizer name, built-in model name, or the CLIP
BPE ``SimpleTokenizer``) and builds the tokenizer on first use; pickling drops the built tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class OpenCLIPTokenizer:
    """``texts (list[str] | str) -> LongTensor [B, context_length]``, open_clip's tokenizer for a model.

    Picklable and cheap to pickle (DataLoader workers): only the recipe is stored and the tokenizer is built
    on first use. An HF text tower gets open_clip's ``HFTokenizer`` on ``hf_tokenizer_name`` (padded to
    ``context_length`` with the pad id, which the tower masks); a built-in model gets
    ``open_clip.get_tokenizer(model_name)``; anything else the CLIP BPE ``SimpleTokenizer``.
    """

    def __init__(
        self,
        context_length: int,
        hf_tokenizer_name: str | None = None,
        model_name: str | None = None,
        tokenizer_mode: str | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.context_length = int(context_length)
        self.hf_tokenizer_name = hf_tokenizer_name
        self.model_name = model_name
        self.tokenizer_mode = tokenizer_mode
        self.tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._tokenizer: Any = None

    def _build(self) -> Any:
        import open_clip

        if self.hf_tokenizer_name:
            from open_clip.tokenizer import HFTokenizer

            return HFTokenizer(self.hf_tokenizer_name, context_length=self.context_length, tokenizer_mode=self.tokenizer_mode,
                               **self.tokenizer_kwargs)
        if self.model_name:
            return open_clip.get_tokenizer(self.model_name, context_length=self.context_length)
        return open_clip.SimpleTokenizer(context_length=self.context_length, **self.tokenizer_kwargs)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """``[B, context_length]`` token ids; a shorter ``context_length`` than the model's may be asked for."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"OpenCLIPTokenizer expects a string or a list of strings, got {type(texts).__name__}")
        if self._tokenizer is None:
            self._tokenizer = self._build()
        return self._tokenizer(list(texts), context_length or self.context_length).long()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __repr__(self) -> str:
        source = self.hf_tokenizer_name or self.model_name or "SimpleTokenizer"
        return f"OpenCLIPTokenizer({source!r}, context_length={self.context_length})"

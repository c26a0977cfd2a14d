"""HFTextEncoder: any Hugging Face transformers text model as an embedding encoder.

The text counterpart of ``TimmEncoder``: a transformer body from ``transformers.AutoModel``, a
pooling of its last hidden states over the real (non-padding) tokens, an optional linear head and
an optional L2 normalisation. The tokenizer is data, not part of ``forward``: ``data_config``
names it (the model's folder or hub id, a ``str`` so that it pickles cheaply to loader workers) and
``datamodules.inputs.TextInputs`` tokenizes whole batches in the loaders' collate function, so
``forward`` reads the tokenizer's output (``input_ids``, ``attention_mask``, ``token_type_ids``)
and never a string. ``encode(texts)`` is the one-call path for users and callbacks (the verb and
meaning of sentence-transformers' ``SentenceTransformer.encode``).

Queries and documents may be truncated at different lengths: ``max_length`` is the documents' (and
every text's by default), ``query_max_length`` the queries'. Retrieval training keeps queries short
because they are: Tevatron's MS MARCO example trains BERT-base with ``--q_max_len 16 --p_max_len 128``
(texttron/tevatron ``examples/example_msmarco.md``, git 04eaa63; its argument defaults are 32 and 128),
STAR with ``--max_query_length 24 --max_doc_length 120`` (jingtaozhan/DRhard README). Batches are
padded to their longest text, so one long query under the documents' limit pads every query of its
batch to it; one length for both would instead cut the documents at the queries' length. ``data_config``
carries ``query_max_length`` (only when set) to ``TextInputs``, which tokenizes the query role's fields
at it; ``encode(queries, max_length=enc.query_max_length)`` or ``encode_query(queries)`` does the
same for raw strings (sentence-transformers' ``encode_query`` and its per-task ``query_length``).

Weights come from a local folder in ``save_pretrained`` layout or from a hub id. The machines
that build this project are offline (``HF_HUB_OFFLINE=1``): a hub id that is not in the Hugging
Face cache fails at once with ``PretrainedWeightsUnavailable`` (the error ``hardneg fit`` prints
as one line for timm presets too) naming the model and how to give a local folder instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contracts.arguments import is_int_at_least
from models.timm_encoder import PretrainedWeightsUnavailable

POOLINGS = ("mean", "cls", "last")
# Keys of a tokenizer's output that a transformers model's forward takes.
_MODEL_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_TRUE = ("1", "true", "yes", "on")


class HFTextEncoder(nn.Module):
    """Embeds tokenized text with a transformers model: ``inputs -> emb [B, embed_dim]``.

    The embedding is ``z = W pool(h) + b`` (or ``pool(h)`` without head), then ``z / ||z||_2``
    when ``normalize``, where ``h = f(x) [B, L, H]`` are the model's last hidden states and the
    pooling reads only the tokens whose attention mask is 1:

    - ``mean``: ``sum_t m_t h_t / sum_t m_t``, the mean of the real tokens (Reimers & Gurevych,
      "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks", EMNLP 2019, Sec. 3: MEAN
      pooling, their best strategy; the pooling of all-MiniLM-L6-v2 and of the E5 models);
    - ``cls``: the first real token (``[CLS]`` under right padding), as in Karpukhin et al.,
      "Dense Passage Retrieval for Open-Domain Question Answering", EMNLP 2020, Sec. 3.1;
    - ``last``: the last real token of each row, for decoder-only (causal) models whose last token
      has attended to the whole text (Wang et al., "Improving Text Embeddings with Large Language
      Models", ACL 2024, Sec. 3: last-token pooling). Left and right padding are both handled.

    Args:
        model_name_or_path: a local folder in ``save_pretrained`` layout (config, weights,
            tokenizer files) or a Hugging Face hub id (``"intfloat/e5-base-v2"``).
        pooling: ``"mean"``, ``"cls"`` or ``"last"`` (above).
        max_length: tokens per text; longer texts are truncated (``data_config["max_length"]``). With
            ``query_max_length`` set, the documents' length only.
        query_max_length: tokens per query (``data_config["query_max_length"]``, read by ``TextInputs``
            for the fields whose role is ``"query"``; ``encode_query``). ``None``: ``max_length``, one
            length for every text (DPR, sentence-transformers' ``max_seq_length``). Tevatron's MS MARCO
            BERT-base: ``max_length=128, query_max_length=16``.
        embed_dim: ``None`` (or 0): no head, the embedding is the pooled hidden state (the
            model's hidden size); an int: a linear projection head ``hidden -> embed_dim``.
        normalize: L2-normalise the output.
        query_prefix, doc_prefix: text the model expects before a query / a document (E5's
            ``"query: "`` / ``"passage: "``); carried in ``data_config`` for the DataModule and
            given to ``encode(texts, prefix=...)``. ``forward`` sees tokens and never adds them.
        gradient_checkpointing: recompute the transformer's activations in the backward pass
            (``model.gradient_checkpointing_enable``, non-reentrant): less memory, ~30% slower.
        trust_remote_code: allow models whose code lives in their hub repository.

    Attributes:
        embed_dim: output size. hidden_size: the model's hidden size. model: the transformers
        model. tokenizer: the loaded tokenizer object (``encode`` uses it).
        data_config: ``{"tokenizer": str, "max_length": int[, "query_max_length", "query_prefix", "doc_prefix"]}``.
    """

    def __init__(
        self,
        model_name_or_path: str,
        pooling: str = "mean",
        max_length: int = 256,
        query_max_length: int | None = None,
        embed_dim: int | None = None,
        normalize: bool = True,
        query_prefix: str | None = None,
        doc_prefix: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"HFTextEncoder pooling must be one of {POOLINGS}, got {pooling!r}")
        if not is_int_at_least(max_length, 1):
            raise ValueError(f"HFTextEncoder max_length must be a positive int, got {max_length!r}")
        if query_max_length is not None and not is_int_at_least(query_max_length, 1):
            raise ValueError(f"HFTextEncoder query_max_length must be a positive int, or None for max_length; got {query_max_length!r}")
        if embed_dim is not None and not is_int_at_least(embed_dim, 0):
            raise ValueError(f"HFTextEncoder embed_dim must be a positive int, or None/0 for no head; got {embed_dim!r}")
        for name, value in (("query_prefix", query_prefix), ("doc_prefix", doc_prefix)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"HFTextEncoder {name} must be a str or None, got {type(value).__name__}")

        source = _resolve_source(os.fspath(model_name_or_path))
        self.model, self.tokenizer = _load(source, trust_remote_code)
        model_max = getattr(self.tokenizer, "model_max_length", None)
        for name, value in (("max_length", max_length), ("query_max_length", query_max_length)):
            if isinstance(model_max, int) and model_max < 1_000_000 and value is not None and value > model_max:
                raise ValueError(
                    f"HFTextEncoder('{source}'): {name}={value} exceeds the {model_max} tokens the model was "
                    f"built for (its tokenizer's model_max_length); use {name} <= {model_max}"
                )
        if gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"HFTextEncoder('{source}'): {type(self.model).__name__} does not support gradient_checkpointing")
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            # BERT-style models add a tanh pooler over [CLS] that this encoder never reads; its
            # parameters would get no gradient, which DDP (find_unused_parameters=False) rejects.
            pooler.requires_grad_(False)
        config = self.model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None)
        if not isinstance(hidden, int):
            raise TypeError(f"HFTextEncoder('{source}'): its config ({type(config).__name__}) has no hidden_size or d_model")
        self.model_name_or_path = source
        self.pooling = pooling
        self.max_length = max_length
        self.query_max_length = query_max_length
        self.normalize = normalize
        self.query_prefix = query_prefix
        self.doc_prefix = doc_prefix
        self.hidden_size = hidden
        self.embed_dim = int(embed_dim) if embed_dim else hidden
        self.head: nn.Module = nn.Linear(hidden, self.embed_dim) if embed_dim else nn.Identity()
        # The tokenizer's own input names (DistilBERT takes no token_type_ids).
        names = set(getattr(self.tokenizer, "model_input_names", _MODEL_KEYS))
        self._input_keys = tuple(k for k in _MODEL_KEYS if k in names) or ("input_ids", "attention_mask")
        # transformers' from_pretrained returns the model in eval mode; a new encoder is in training mode like any
        # nn.Module (dropout on while fine-tuning, as sentence-transformers trains). Lightning does not switch modes
        # at fit start: without this, every text run trained with dropout off.
        self.train()

    @property
    def data_config(self) -> dict[str, Any]:
        """What the DataModule's ``TextInputs`` reads: the tokenizer (folder or hub id), max lengths, prefixes."""
        cfg: dict[str, Any] = {"tokenizer": self.model_name_or_path, "max_length": self.max_length}
        if self.query_max_length is not None:
            cfg["query_max_length"] = self.query_max_length
        if self.query_prefix is not None:
            cfg["query_prefix"] = self.query_prefix
        if self.doc_prefix is not None:
            cfg["doc_prefix"] = self.doc_prefix
        return cfg

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """hidden ``[B, L, H]``, attention_mask ``[B, L]`` (1 = real token) -> pooled ``[B, H]`` (float32)."""
        hidden = hidden.float()
        mask = attention_mask.to(device=hidden.device, dtype=torch.long)
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if self.pooling == "cls":  # argmax gives the first 1: the first real token under either padding
            return hidden[rows, mask.argmax(dim=1)]
        last = hidden.shape[1] - 1 - mask.flip(dims=(1,)).argmax(dim=1)
        return hidden[rows, last]

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """inputs: a tokenizer's output ``{"input_ids": [B, L], "attention_mask": [B, L][, "token_type_ids"]}``
        -> embeddings ``[B, embed_dim]``, float32 (the autocast dtype under autocast when there is a head).

        Other keys are ignored. A batch's prefixed fields (``query_input_ids`` ...) are the
        LightningModule's to split; this takes the plain names."""
        if not isinstance(inputs, Mapping):
            raise TypeError(
                f"HFTextEncoder.forward expects a tokenizer's output (a mapping with input_ids and attention_mask), "
                f"got {type(inputs).__name__}"
            )
        missing = [k for k in ("input_ids", "attention_mask") if k not in inputs]
        if missing:
            raise KeyError(
                f"HFTextEncoder.forward: inputs lack {missing}; got keys {sorted(inputs)}. Expected a tokenizer's "
                f"output with plain names (strip a batch's 'query_'/'doc_' prefix first)"
            )
        ids = inputs["input_ids"]
        if ids.dim() != 2 or inputs["attention_mask"].shape != ids.shape:
            raise ValueError(
                f"HFTextEncoder.forward: input_ids {tuple(ids.shape)} and attention_mask "
                f"{tuple(inputs['attention_mask'].shape)} must both be [B, L]"
            )
        hidden = self.model(**{k: inputs[k] for k in self._input_keys if k in inputs}).last_hidden_state
        emb = self.head(self.pool(hidden, inputs["attention_mask"]))
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb if torch.is_autocast_enabled(emb.device.type) else emb.float()

    @torch.no_grad()
    def encode(
        self,
        texts: Sequence[str],
        batch_size: int = 64,
        prefix: str | None = None,
        device: str | torch.device | None = None,
        show_progress: bool = False,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Embed raw strings: ``texts [N] -> emb [N, embed_dim]`` (float32, on the CPU, input order).

        Runs without a graph and in eval mode (the previous mode is restored). Texts are batched
        longest first, so each batch pads to similar lengths, and the rows put back in input
        order. ``prefix`` is prepended to every text: ``enc.encode(queries, prefix=enc.query_prefix)``.
        ``max_length``: tokens per text (``None``: ``self.max_length``); queries are
        ``enc.encode(queries, prefix=enc.query_prefix, max_length=enc.query_max_length)``, which
        ``encode_query`` spells out. ``device``: move the encoder there first (it stays there, as in
        sentence-transformers); default: where its parameters are.
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"HFTextEncoder.encode expects a list of str, got {type(texts).__name__}; wrap a single text in a list")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"HFTextEncoder.encode: texts[{bad}] is a {type(texts[bad]).__name__}, expected str")
        if not is_int_at_least(batch_size, 1):
            raise ValueError(f"HFTextEncoder.encode batch_size must be a positive int, got {batch_size!r}")
        if max_length is None:
            max_length = self.max_length
        elif not is_int_at_least(max_length, 1):
            raise ValueError(f"HFTextEncoder.encode max_length must be a positive int or None (the encoder's max_length), got {max_length!r}")
        if device is not None:
            self.to(device)
        target = next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), self.embed_dim, dtype=torch.float32)
        starts = range(0, len(texts), batch_size)
        if show_progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        was_training = self.training
        self.eval()
        try:
            for start in starts:
                rows = order[start:start + batch_size]
                batch = [(prefix or "") + texts[i] for i in rows]
                tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
                out[rows] = self({k: v.to(target) for k, v in tokens.items()}).float().cpu()
        finally:
            self.train(was_training)
        return out

    def encode_query(self, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
        """``encode`` as queries: the query prefix and ``query_max_length`` (keyword arguments override them;
        the verb of sentence-transformers' ``SentenceTransformer.encode_query``)."""
        kwargs.setdefault("prefix", self.query_prefix)
        kwargs.setdefault("max_length", self.query_max_length)
        return self.encode(texts, **kwargs)

    def encode_document(self, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
        """``encode`` as documents: the document prefix and ``max_length`` (keyword arguments override them)."""
        kwargs.setdefault("prefix", self.doc_prefix)
        return self.encode(texts, **kwargs)

    def extra_repr(self) -> str:
        query = f", query_max_length={self.query_max_length}" if self.query_max_length is not None else ""
        return (
            f"model_name_or_path={self.model_name_or_path!r}, pooling={self.pooling!r}, max_length={self.max_length}{query}, "
            f"embed_dim={self.embed_dim}, normalize={self.normalize}"
        )


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set now or was when huggingface_hub was imported."""
    if any(os.environ.get(k, "").lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _resolve_source(name: str) -> str:
    """An existing local folder (absolute, so loader workers find it from any cwd) or a hub id."""
    if not name:
        raise ValueError("HFTextEncoder model_name_or_path is empty; give a local model folder or a hub id such as 'intfloat/e5-base-v2'")
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"HFTextEncoder: model folder {path} has no config.json; expected a transformers model saved with "
                f"save_pretrained (config.json, model.safetensors or pytorch_model.bin, tokenizer files)"
            )
        return os.path.abspath(path)
    if os.path.exists(path) or _looks_like_path(name):
        kind = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"HFTextEncoder: model folder {path} {kind}; expected a transformers model folder (save_pretrained "
            f"layout) or a hub id such as 'intfloat/e5-base-v2'"
        )
    return name


def _unavailable(name: str, err: BaseException | None) -> PretrainedWeightsUnavailable:
    why = "the hub is offline (HF_HUB_OFFLINE is set)" if hub_offline() else "the hub cannot be reached"
    cause = f" ({type(err).__name__})" if err is not None else ""
    return PretrainedWeightsUnavailable(
        f"HFTextEncoder('{name}'): cannot load the hub model {name}: it is not in the Hugging Face cache and {why}{cause}. "
        f"Either download it once on a machine with network (`hf download {name}`, then copy ~/.cache/huggingface), "
        f"or save it there with save_pretrained and pass the local folder: model_name_or_path: /path/to/folder "
        f"(for a preset: encoder init_args overrides: {{model_name_or_path: /path/to/folder}})"
    )


def _load(source: str, trust_remote_code: bool) -> tuple[nn.Module, Any]:
    """The transformers model (float32) and tokenizer of a local folder or hub id."""
    local = os.path.isdir(source)
    if not local and hub_offline():
        from huggingface_hub import try_to_load_from_cache

        # Fail at once: offline, transformers would otherwise only say "couldn't connect".
        if not isinstance(try_to_load_from_cache(source, "config.json"), str):
            raise _unavailable(source, None)
    from transformers import AutoModel, AutoTokenizer

    try:
        model = AutoModel.from_pretrained(source, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        if local:
            raise OSError(
                f"HFTextEncoder: cannot load the model folder {source}: {err}. Expected a transformers model saved "
                f"with save_pretrained (config.json, weights, tokenizer files)"
            ) from err
        raise _unavailable(source, err) from err
    return model, tokenizer

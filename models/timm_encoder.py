"""TimmEncoder: any timm backbone as an embedding encoder (pooling, linear head, L2 norm)."""

import importlib
import os
from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DOWNLOAD_ERRORS = ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib")


class PretrainedWeightsUnavailable(OSError):
    """``pretrained=True`` but the hub weights are neither cached nor downloadable (offline, no network).

    The message names the weights (``timm/resnet50.tv_in1k``) and how to give a local file instead;
    ``hardneg fit`` prints it without a traceback."""


def _weights_unavailable(model_name: str, hub_id: Optional[str], err: BaseException) -> PretrainedWeightsUnavailable:
    source = hub_id or f"timm's pretrained '{model_name}'"
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") else ""
    return PretrainedWeightsUnavailable(
        f"TimmEncoder('{model_name}', pretrained=True): cannot load the weights {source}: they are not in the "
        f"Hugging Face cache and the hub cannot be reached{offline} ({type(err).__name__}). Either download them "
        f"once on a machine with network (`hf download {hub_id or model_name}`, then copy ~/.cache/huggingface), or "
        f"give a local file in timm's layout with pretrained: false and weights: /path/to/model.safetensors "
        f"(for a preset: encoder init_args overrides: {{pretrained: false, weights: /path/to/model.safetensors}}; "
        f"pretrained: false alone trains from random weights)"
    )


class TimmEncoder(nn.Module):
    """Embeds images with a timm backbone: ``x [B, C, H, W] -> emb [B, embed_dim]``.

    Backbones come from timm (Wightman, "PyTorch Image Models", 2019), built without classifier.

    The embedding is ``z = BN?(W pool(f(x)) + b)``, then ``z / ||z||_2`` when ``normalize``, the
    usual deep metric learning head on a pretrained trunk (Musgrave, Belongie, Lim, "A Metric
    Learning Reality Check", ECCV 2020, Sec. 4: trunk + one linear embedder).

    Args:
        model_name: any ``timm.list_models()`` name, with an optional pretrained tag
            (``"resnet50.tv_in1k"``).
        embed_dim: size of the linear embedding head; ``None`` or ``0``: no head, the pooled
            backbone features are the embedding.
        pretrained: load timm's hub weights (``timm.create_model(..., pretrained=True)``).
        weights: path of a local weights file in timm's layout (a state dict, or a checkpoint with
            ``state_dict``/``model``; ``.safetensors`` too). A classifier in the file is ignored;
            a 3-channel stem is adapted to ``in_chans``. Exclusive with ``pretrained``.
        pool: global pooling, passed to timm's ``global_pool``: CNNs ``avg|max|avgmax|catavgmax``
            (``catavgmax`` doubles the features), ViTs ``token|avg|max|avgmax|map``.
        head_bn: BatchNorm1d after the linear head.
        normalize: L2-normalise the output.
        freeze_bn: every BatchNorm of the backbone stays in eval mode (running statistics frozen,
            batch statistics unused) even under ``train()``, and its affine parameters get no
            gradient: the "frozen BN" of DML recipes (Kim et al., "Proxy Anchor Loss for Deep
            Metric Learning", CVPR 2020, Sec. 5.1), which keeps small P x K batches from
            corrupting ImageNet statistics.
        drop_rate: dropout on the pooled features (timm's ``drop_rate``).
        img_size: input side length. Fixed-size models (ViT) are built for it; for the others it
            only sets ``data_config["input_size"]``.
        in_chans: input channels (1 for grayscale), passed to timm.
        mean, std: override the normalisation of ``data_config`` (one value per channel).
        model_kwargs: more keyword arguments for ``timm.create_model`` (``drop_path_rate`` ...).

    Attributes:
        embed_dim: output size. num_features: pooled backbone size.
        data_config: ``input_size, mean, std, interpolation, crop_pct, crop_mode`` for the
            DataModule's transforms (``timm.data.resolve_model_data_config`` plus overrides).
    """

    def __init__(
        self,
        model_name: str,
        embed_dim: Optional[int] = 128,
        pretrained: bool = False,
        weights: Optional[str] = None,
        pool: str = "avg",
        head_bn: bool = False,
        normalize: bool = True,
        freeze_bn: bool = False,
        drop_rate: float = 0.0,
        img_size: Optional[int] = None,
        in_chans: int = 3,
        mean: Optional[Tuple[float, ...]] = None,
        std: Optional[Tuple[float, ...]] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        import timm  # ~2.5 s: keep `import models` fast

        if not timm.is_model(model_name):
            raise ValueError(
                f"timm has no model named '{model_name}'; search with timm.list_models('*part*')"
            )
        if pretrained and weights is not None:
            raise ValueError(
                f"give either pretrained=True (hub weights) or weights={weights!r} (a local file), "
                "not both"
            )
        if embed_dim is not None and embed_dim < 0:
            raise ValueError(f"embed_dim must be a positive int, or None/0 for no head; got {embed_dim}")
        if not pool:
            raise ValueError("pool must name a global pooling (e.g. 'avg'); got an empty string")
        if img_size is not None and img_size <= 0:
            raise ValueError(f"img_size must be a positive int, got {img_size}")

        kwargs: Dict[str, Any] = dict(model_kwargs or {})
        kwargs.update(num_classes=0, global_pool=pool, in_chans=in_chans)
        if drop_rate:
            kwargs["drop_rate"] = drop_rate
        pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
        if img_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
            kwargs["img_size"] = img_size  # position embeddings etc. are built for one size
        try:
            self.backbone = timm.create_model(model_name, pretrained=pretrained, **kwargs)
        except AssertionError as err:  # timm validates pool types etc. with asserts
            raise ValueError(
                f"timm model '{model_name}' rejected pool={pool!r} or model_kwargs "
                f"{model_kwargs}: {err}"
            ) from err
        except Exception as err:
            # Offline or no network: the hub error names neither the weights nor the way around it.
            if pretrained and (isinstance(err, OSError) or type(err).__module__.split(".")[0] in _DOWNLOAD_ERRORS):
                hub_id = getattr(pretrained_cfg, "hf_hub_id", None) if pretrained_cfg is not None else None
                raise _weights_unavailable(model_name, hub_id, err) from err
            raise
        if weights is not None:
            _load_timm_weights(self.backbone, weights, model_name, in_chans)

        self.model_name = model_name
        self.normalize = normalize
        self.freeze_bn = freeze_bn
        self.num_features = int(getattr(self.backbone, "head_hidden_size", self.backbone.num_features))
        self.embed_dim = int(embed_dim) if embed_dim else self.num_features
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        if embed_dim:
            layers["fc"] = nn.Linear(self.num_features, self.embed_dim)
        if head_bn:
            layers["bn"] = nn.BatchNorm1d(self.embed_dim)
        self.head = nn.Sequential(layers)
        self.data_config = _data_config(self.backbone, img_size, in_chans, mean, std)

        if freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, _BATCH_NORMS):
                    for param in module.parameters(recurse=False):
                        param.requires_grad_(False)
            self.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_chans, H, W] -> backbone output before pooling: [B, C, H', W'] for CNNs,
        [B, tokens, C] for transformers."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """features from ``forward_features`` -> pooled, projected, normalised: [B, embed_dim]."""
        pooled = self.backbone.forward_head(features, pre_logits=True)
        emb = self.head(pooled)
        return F.normalize(emb, dim=-1) if self.normalize else emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, in_chans, H, W] -> embeddings [B, embed_dim]."""
        return self.forward_head(self.forward_features(x))

    def train(self, mode: bool = True) -> "TimmEncoder":
        super().train(mode)
        if self.freeze_bn:
            for module in self.backbone.modules():
                if isinstance(module, _BATCH_NORMS):
                    module.eval()
        return self

    def extra_repr(self) -> str:
        return (
            f"model_name={self.model_name!r}, embed_dim={self.embed_dim}, "
            f"normalize={self.normalize}, freeze_bn={self.freeze_bn}"
        )


def _data_config(
    backbone: nn.Module,
    img_size: Optional[int],
    in_chans: int,
    mean: Optional[Tuple[float, ...]],
    std: Optional[Tuple[float, ...]],
) -> Dict[str, Any]:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    size = tuple(cfg["input_size"][1:]) if img_size is None else (img_size, img_size)
    out: Dict[str, Any] = {"input_size": (in_chans, *size)}
    for key, given in (("mean", mean), ("std", std)):
        values = tuple(float(v) for v in (given if given is not None else cfg[key]))
        if given is None and len(values) != in_chans:
            # A stem adapted to in_chans sums over the RGB filters: use one shared statistic.
            values = (sum(values) / len(values),) * in_chans
        if len(values) != in_chans:
            raise ValueError(f"{key} has {len(values)} values; expected one per channel ({in_chans})")
        out[key] = values
    out["interpolation"] = cfg.get("interpolation", "bicubic")
    out["crop_pct"] = cfg.get("crop_pct", 0.875)
    out["crop_mode"] = cfg.get("crop_mode", "center")
    return out


def _load_timm_weights(backbone: nn.Module, path: str, model_name: str, in_chans: int) -> None:
    """Load a timm-layout weights file into ``backbone`` (built with ``num_classes=0``)."""
    from timm.models import adapt_input_conv, load_state_dict

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist (TimmEncoder weights=)")
    state = load_state_dict(path)
    # The model's own converter (e.g. ViT position-embedding resampling), when it has one.
    filter_fn = getattr(importlib.import_module(type(backbone).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, backbone)
    target = backbone.state_dict()
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    classifiers = cfg.get("classifier") or ()
    for prefix in (classifiers,) if isinstance(classifiers, str) else classifiers:
        for key in [k for k in state if k.startswith(prefix + ".") and k not in target]:
            del state[key]
    first_conv = cfg.get("first_conv")
    stem = f"{first_conv}.weight" if isinstance(first_conv, str) else None
    if stem in state and stem in target and state[stem].shape[1] != target[stem].shape[1]:
        state[stem] = adapt_input_conv(in_chans, state[stem])
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"weights file {path} does not fit timm model '{model_name}': {err}") from err
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit timm model '{model_name}': "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}; expected a state dict of this architecture in timm's key layout"
        )

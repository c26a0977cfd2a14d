"""OpenCLIPEncoder: an open_clip image-text model as a pair of embedding encoders with a learnable temperature.

open_clip (Ilharco et al., "OpenCLIP", 2021) builds CLIP-style dual encoders from data: a model is a
config (``embed_dim``, ``vision_cfg``, ``text_cfg``) and its weights come from a pretrained tag, a hub
repository or a local file. This adapter gives the training code three ways in, all through open_clip's
own factory (``open_clip.create_model``), never a reimplementation:

- a built-in name with a pretrained tag (``model_name="ViT-B-32", pretrained="openai"``);
- a built-in name (or ``hf-hub:``/``local-dir:`` identifier) and a local ``checkpoint`` file;
- a custom architecture ``model_cfg`` (a timm image tower, an HF text tower ...), registered with
  open_clip at run time (:mod:`models.open_clip_config`).

The contrastive logits are those of CLIP (Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision", ICML 2021, Sec. 2.5 and Fig. 3): ``logits = exp(t) * I_e @ T_e^T`` on L2-normalised
embeddings, ``t`` a learnable log temperature initialised to ``log(1 / 0.07)`` and kept at most ``log(100)``
("clipped to prevent scaling the logits by more than 100"; open_clip clamps after every optimiser step:
``clamp_logit_scale_()``). SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023,
Eq. 1 and Sec. 3.3) adds a learnable bias, ``logits = exp(t') * x @ y^T + b``, initialised to ``t' = log 10``
and ``b = -10``: pass ``init_logit_scale=math.log(10), init_logit_bias=-10``.

Design decisions:

- The open_clip model is the one submodule (``self.model``); ``logit_scale``/``logit_bias`` are its own
  parameters, so an open_clip checkpoint and this module's ``state_dict`` (keys ``model.*``) hold the same
  tensors, and a loss reads them from ``forward``'s dict (``loss(**encoder(image=..., text=...))``).
- ``image_encoder`` / ``text_encoder`` are views for gradient caching, which calls ``encoder(chunk)`` and asks
  ``encoder.parameters()``/``buffers()`` which tower it touches. They are not registered submodules (no
  parameter appears twice in ``.parameters()`` or the ``state_dict``) and hold the parent as a plain
  attribute, so ``copy.deepcopy`` (a momentum copy) and pickling (DDP spawn) give views of the copy.
- Weights (a pretrained tag resolved before building, a local checkpoint, the offline error) are
  :mod:`models.open_clip_weights`; the picklable tokenizer is :mod:`models.open_clip_tokenizer`.
- ``import models`` stays light: open_clip (and with it timm and transformers) is imported inside the
  constructor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from models.open_clip_config import checked_model_cfg, checked_model_name, register_model_cfg
from models.open_clip_tokenizer import OpenCLIPTokenizer
from models.open_clip_weights import is_download_error, load_checkpoint, offline_message, resolve_pretrained
from models.timm_encoder import PretrainedWeightsUnavailable


class OpenCLIPEncoder(nn.Module):
    """An open_clip dual encoder: ``encode_image [B, 3, H, W] -> [B, D]``, ``encode_text [B, L] -> [B, D]``.

    Args:
        model_name: an ``open_clip.list_models()`` name (``"ViT-B-32"``), or an ``hf-hub:org/repo`` /
            ``local-dir:/path`` identifier. Exclusive with ``model_cfg``.
        pretrained: a pretrained tag of ``model_name`` (``open_clip.list_pretrained_tags_by_model``), loaded
            from the hub cache or downloaded. Exclusive with ``checkpoint``.
        checkpoint: a local weights file for the whole model: a state dict (open_clip's keys, or this
            module's ``model.*`` keys), or a checkpoint dict holding it under ``"state_dict"``
            (``open_clip_train``'s ``epoch_N.pt``). When given, the towers' own pretrained weights
            (``timm_model_pretrained``, ``hf_model_pretrained``) are not loaded first.
        model_cfg: a custom architecture in open_clip's config format, e.g. ``{"embed_dim": 256,
            "vision_cfg": {"timm_model_name": ..., "timm_pool": "avg", "timm_proj": "linear"}, "text_cfg":
            {"hf_model_name": ..., "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear"}}``. The towers'
            own weights load when ``vision_cfg.timm_model_pretrained`` / ``text_cfg.hf_model_pretrained``
            (default true) say so; ``hf_tokenizer_name`` defaults to ``hf_model_name``.
        image_size: the input side length (open_clip's ``force_image_size``; ViT position embeddings are
            resampled, a CNN tower only changes its ``data_config``).
        init_logit_scale: initial log temperature (CLIP: ``log(1/0.07)``, SigLIP: ``log(10)``). Pretrained
            weights bring their own trained value.
        init_logit_bias: initial logit bias (SigLIP: ``-10``); ``None``: no bias parameter.
        max_logit_scale: ``clamp_logit_scale_()`` keeps ``logit_scale`` in ``[0, max_logit_scale]``.
        normalize: L2-normalise the embeddings (as ``open_clip``'s ``CLIP.forward`` does).
        preprocess_cfg: overrides of open_clip's preprocessing config (``mean``, ``std``, ``interpolation``,
            ``resize_mode``), e.g. the statistics a custom image tower was trained with.

    Attributes:
        model: the open_clip model (``CLIP`` or ``CustomTextCLIP``).
        embed_dim: the joint embedding size D.
        data_config: ``input_size (3, H, W), mean, std, interpolation, crop_pct`` for the image transforms,
            and ``tokenizer`` (picklable, ``list[str] -> LongTensor [B, context_length]``) and
            ``context_length`` for the texts.
        tokenizer, context_length: the same as in ``data_config``.
        image_encoder, text_encoder: views whose ``forward`` is ``encode_image`` / ``encode_text``.
    """

    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        checkpoint: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        image_size: int | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float | None = None,
        max_logit_scale: float = math.log(100),
        normalize: bool = True,
        preprocess_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if (model_name is None) == (model_cfg is None):
            raise ValueError("OpenCLIPEncoder: give exactly one of model_name (an open_clip model name) and model_cfg "
                             f"(a custom architecture config); got model_name={model_name!r} and "
                             f"model_cfg={'a dict' if model_cfg is not None else None}")
        if pretrained is not None and checkpoint is not None:
            raise ValueError(f"OpenCLIPEncoder: give either pretrained={pretrained!r} (a tag) or checkpoint={checkpoint!r} "
                             "(a local file), not both")
        if model_cfg is not None and pretrained is not None:
            raise ValueError(f"OpenCLIPEncoder: pretrained={pretrained!r} names a tag of a built-in model; a custom "
                             "model_cfg loads its weights from checkpoint= (or from its towers' own pretrained weights)")
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"OpenCLIPEncoder: image_size must be a positive int, got {image_size!r}")
        if not max_logit_scale > 0:
            raise ValueError(f"OpenCLIPEncoder: max_logit_scale must be > 0 (log(100) in CLIP), got {max_logit_scale}")
        if checkpoint is not None:
            checkpoint = os.fspath(checkpoint)
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"OpenCLIPEncoder checkpoint={checkpoint!r}: no such file; expected a state dict "
                                        "or an open_clip checkpoint with 'state_dict' (torch.save / .safetensors)")

        import open_clip  # ~5 s with timm and transformers: keep `import models` fast

        kwargs: dict[str, Any] = {"init_logit_scale": float(init_logit_scale), "init_logit_bias": init_logit_bias}
        if model_cfg is not None:
            cfg = checked_model_cfg(model_cfg)
            name = register_model_cfg(cfg)
            builtin = False
            kwargs["pretrained_image"] = checkpoint is None and bool(cfg["vision_cfg"].get("timm_model_pretrained", False))
            kwargs["pretrained_text"] = checkpoint is None and bool(cfg["text_cfg"].get("hf_model_pretrained", True))
        else:
            name = checked_model_name(model_name)
            builtin = True
            cfg = open_clip.get_model_config(name) if not name.startswith("hf-hub:") else None
            kwargs["pretrained_text"] = checkpoint is None
            if pretrained is not None:
                kwargs.update(resolve_pretrained(name, pretrained, cfg))
        if image_size is not None:
            kwargs["force_image_size"] = image_size
        if preprocess_cfg:
            kwargs["force_preprocess_cfg"] = dict(preprocess_cfg)
        try:
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
        except (KeyError, TypeError) as err:
            text_cfg = (cfg or {}).get("text_cfg", {})
            if text_cfg.get("hf_model_name"):
                raise ValueError(
                    f"OpenCLIPEncoder: open_clip could not build the HF text tower {text_cfg['hf_model_name']!r} ({err!r}); "
                    "its HF adapter supports bert, roberta, xlm-roberta, mt5 and m2m_100 configs only") from err
            raise
        except Exception as err:
            if name.startswith("hf-hub:") and is_download_error(err):
                raise PretrainedWeightsUnavailable(offline_message(name, None, name[len("hf-hub:"):], err)) from err
            raise
        if checkpoint is not None:
            load_checkpoint(model, checkpoint, name)

        self.model = model
        self.model_name = name
        self.normalize = bool(normalize)
        self.max_logit_scale = float(max_logit_scale)
        final_cfg = cfg if cfg is not None else {}
        self.embed_dim = int(final_cfg.get("embed_dim") or _probe_embed_dim(model))
        text_cfg = dict(final_cfg.get("text_cfg", {}))
        self.context_length = int(text_cfg.get("context_length") or getattr(model, "context_length", 77))
        self.tokenizer = OpenCLIPTokenizer(
            self.context_length,
            hf_tokenizer_name=text_cfg.get("hf_tokenizer_name") if not builtin else None,
            model_name=name if builtin else None,
            tokenizer_mode=text_cfg.get("tokenizer_mode"),
            tokenizer_kwargs=text_cfg.get("tokenizer_kwargs"),
        )
        self.data_config = _data_config(open_clip.get_model_preprocess_cfg(model), self.tokenizer, self.context_length)
        # Plain attributes, not submodules: see the module docstring.
        object.__setattr__(self, "image_encoder", TowerView(self, "image"))
        object.__setattr__(self, "text_encoder", TowerView(self, "text"))

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learnable log temperature ``t`` (the logits are scaled by ``exp(t)``)."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The learnable logit bias ``b`` (SigLIP), or ``None``."""
        return getattr(self.model, "logit_bias", None)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp ``logit_scale`` in place to ``[0, max_logit_scale]``; call after every optimiser step."""
        self.model.logit_scale.clamp_(0, self.max_logit_scale)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images: ``[B, 3, H, W]`` float -> ``[B, embed_dim]`` (unit norm when ``normalize``)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"OpenCLIPEncoder.encode_image expects images [B, 3, H, W], got "
                             f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
        return self.model.encode_image(images, normalize=self.normalize)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: ``[B, L]`` integer ids from ``self.tokenizer`` -> ``[B, embed_dim]`` (unit norm when ``normalize``)."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int):
            raise ValueError(f"OpenCLIPEncoder.encode_text expects token ids [B, L] (long) from encoder.tokenizer, got "
                             f"{type(tokens).__name__} {getattr(tokens, 'dtype', '')} {tuple(getattr(tokens, 'shape', ()))}")
        if tokens.shape[1] > self.context_length:
            raise ValueError(f"OpenCLIPEncoder.encode_text: {tokens.shape[1]} tokens per text but the context length is "
                             f"{self.context_length}; tokenize with encoder.tokenizer")
        return self.model.encode_text(tokens, normalize=self.normalize)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Embed either or both modalities: ``{"image_emb", "text_emb", "logit_scale" (exp(t)), "logit_bias"}``.

        An absent modality gives ``None``; the dict is the keyword arguments of an image-text loss.
        """
        if image is None and text is None:
            raise ValueError("OpenCLIPEncoder.forward needs image=[B, 3, H, W] and/or text=[B, L] token ids; got neither")
        return {
            "image_emb": self.encode_image(image) if image is not None else None,
            "text_emb": self.encode_text(text) if text is not None else None,
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }

    def tower_named_tensors(self, tower: str, kind: str = "parameters") -> Iterator[tuple[str, torch.Tensor]]:
        """The parameters (``kind="parameters"``) or buffers (``"buffers"``) of one tower, with the model's names.

        ``"image"``: everything under ``model.visual``; ``"text"``: the rest but the logit scale and bias.
        """
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        named = self.model.named_parameters() if kind == "parameters" else self.model.named_buffers()
        for name, tensor in named:
            is_image = name.startswith("visual.")
            if name in ("logit_scale", "logit_bias") or is_image != (tower == "image"):
                continue
            yield name, tensor

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, embed_dim={self.embed_dim}, context_length={self.context_length}, normalize={self.normalize}"


class TowerView(nn.Module):
    """One tower of an ``OpenCLIPEncoder`` as an encoder: ``forward`` is ``encode_image`` or ``encode_text``.

    It owns nothing: ``parameters()``/``buffers()`` list the tower's tensors of the parent (what gradient
    caching inspects), ``state_dict()`` is empty, and ``train()``/``to()`` go through the parent.
    """

    def __init__(self, parent: OpenCLIPEncoder, tower: str) -> None:
        super().__init__()
        object.__setattr__(self, "parent", parent)  # not a submodule: no second copy of the weights
        self.tower = tower

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        parent = self.parent
        return parent.encode_image(inputs) if self.tower == "image" else parent.encode_text(inputs)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        for name, param in self.parent.tower_named_tensors(self.tower, "parameters"):
            yield prefix + name, param

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for _, param in self.named_parameters():
            yield param

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        for name, buf in self.parent.tower_named_tensors(self.tower, "buffers"):
            yield prefix + name, buf

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        for _, buf in self.named_buffers():
            yield buf

    def extra_repr(self) -> str:
        return f"tower={self.tower!r} of {self.parent.model_name!r}"


def _probe_embed_dim(model: nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    text = getattr(model, "text", None)
    return int(text.output_dim)


def _data_config(preprocess: dict[str, Any], tokenizer: OpenCLIPTokenizer, context_length: int) -> dict[str, Any]:
    size = preprocess.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return {
        "input_size": (3, int(height), int(width)),
        "mean": tuple(float(v) for v in preprocess["mean"]),
        "std": tuple(float(v) for v in preprocess["std"]),
        "interpolation": preprocess.get("interpolation", "bicubic"),
        # open_clip's evaluation transform resizes the short side to the input size and centre-crops it.
        "crop_pct": 1.0,
        "tokenizer": tokenizer,
        "context_length": int(context_length),
    }

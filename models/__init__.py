"""The encoder zoo: adapters that turn backbones into embedding encoders, and named presets.

An encoder is an ``nn.Module`` with ``forward(inputs) -> [B, embed_dim]``, an ``embed_dim`` and a
``data_config`` for the DataModule's transforms. One class per file, named after the class.

- Python: ``create_encoder("lite0-128", img_size=64)``, ``list_encoders()``, or any class directly.
- YAML: ``class_path: models.TimmEncoder`` with its ``init_args``; a preset through
  ``class_path: models.preset`` with ``init_args: {name: lite0-128, overrides: {img_size: 64}}``.
- New preset: a function under ``@register_encoder(name, embed_dim=..., weights=...)``, imported
  below so that registering happens on ``import models``.

Importing this package does not import timm or transformers (they load inside the builders).
"""

from models.registry import (
    PresetInfo,
    create_encoder,
    get_preset_info,
    list_encoders,
    preset,
    register_encoder,
)
from models.timm_encoder import TimmEncoder
from models.momentum import MomentumEncoder
from models.lite0_weights import (
    LITE0_MEAN,
    LITE0_STD,
    load_lite0_weights,
    load_state_dict_by_position,
    lite0_weights_path,
)
from models.hf_text_encoder import HFTextEncoder
from models.open_clip_encoder import OpenCLIPEncoder
from models.scorers import BiEncoderScorer, CrossEncoderScorer, FileScorer
from models import timm_presets  # noqa: F401  registers lite0-128, resnet50-512, vit-s16-384
from models import text_presets  # noqa: F401  registers minilm-l6, minilm-l6-hub, bert-base, e5-base
from models import clip_presets  # noqa: F401  registers lite0-minilm-clip, vit-b-32-openai, vit-b-32-laion2b
from models.text_presets import minilm_l6_path

__all__ = [
    "PresetInfo",
    "create_encoder",
    "get_preset_info",
    "list_encoders",
    "preset",
    "register_encoder",
    "TimmEncoder",
    "HFTextEncoder",
    "OpenCLIPEncoder",
    "BiEncoderScorer",
    "CrossEncoderScorer",
    "FileScorer",
    "MomentumEncoder",
    "LITE0_MEAN",
    "LITE0_STD",
    "load_lite0_weights",
    "load_state_dict_by_position",
    "lite0_weights_path",
    "minilm_l6_path",
]

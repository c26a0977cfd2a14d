"""Image transforms built from an encoder's ``data_config`` (timm's resolved pretrained config)."""

from __future__ import annotations

import math
from typing import Any

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

_DEFAULT_CONFIG = {
    "input_size": (3, 224, 224),
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "interpolation": "bilinear",
    "crop_pct": 0.875,
}


def resolve_data_config(data_config: dict[str, Any] | None) -> dict[str, Any]:
    """Fill the keys a transform needs (input_size, mean, std, interpolation, crop_pct) with ImageNet defaults."""
    cfg = dict(_DEFAULT_CONFIG)
    cfg.update({k: v for k, v in (data_config or {}).items() if v is not None})
    if len(cfg["input_size"]) != 3:
        raise ValueError(f"data_config input_size must be (channels, height, width), got {cfg['input_size']}")
    return cfg


def _interp(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {[m.value for m in InterpolationMode]}") from None


def build_train_transform(
    data_config: dict[str, Any] | None,
    scale: tuple[float, float] = (0.16, 1.0),
    hflip: float = 0.5,
) -> T.Compose:
    """The standard DML train augmentation: RandomResizedCrop + horizontal flip + normalise.

    ``scale=(0.16, 1)`` is the crop range of the Proxy-Anchor / MS-loss code bases; torchvision's
    ImageNet default is ``(0.08, 1)``.
    """
    cfg = resolve_data_config(data_config)
    channels, height, width = cfg["input_size"]
    steps: list[Any] = [_ToChannels(channels), T.RandomResizedCrop((height, width), scale=scale, interpolation=_interp(cfg["interpolation"]))]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps += [T.ToTensor(), T.Normalize(cfg["mean"], cfg["std"])]
    return T.Compose(steps)


def build_eval_transform(data_config: dict[str, Any] | None) -> T.Compose:
    """The standard evaluation transform: resize, center crop, normalise.

    A square input size resizes the *shorter side* to ``size / crop_pct`` (keeping the aspect ratio)
    before the center crop, as timm's eval transform and open_clip's ``image_transform`` do; a
    non-square input size resizes to ``(height, width) / crop_pct``. Stretching a 640x480 COCO photo to
    a square instead would score SugarCrepe or CUB on other pixels than the published numbers were.
    """
    cfg = resolve_data_config(data_config)
    channels, height, width = cfg["input_size"]
    crop_pct = cfg["crop_pct"] or 1.0
    resize = math.floor(height / crop_pct) if height == width else (math.floor(height / crop_pct), math.floor(width / crop_pct))
    return T.Compose(
        [
            _ToChannels(channels),
            T.Resize(resize, interpolation=_interp(cfg["interpolation"])),
            T.CenterCrop((height, width)),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )


class _ToChannels:
    """Convert a PIL image to the encoder's channel count (grayscale data into an RGB backbone)."""

    def __init__(self, channels: int) -> None:
        if channels not in (1, 3):
            raise ValueError(f"image encoders take 1 or 3 channels, data_config asks for {channels}")
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToChannels(mode={self.mode})"

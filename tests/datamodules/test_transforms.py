"""``build_eval_transform`` against open_clip's and timm's evaluation transforms on non-square images."""

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.transforms import build_eval_transform
from tests.helpers import oracle

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth non-square test image (a gradient plus noise): resizing and cropping differences show."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    y = np.linspace(0, 255, height)[:, None, None] * np.array([0.2, 0.6, 1.0])
    return Image.fromarray(np.clip(0.5 * x + 0.5 * y + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("size", [(640, 480), (300, 500)])
def test_equals_open_clip_image_transform(size):
    open_clip = oracle("open_clip")
    theirs = open_clip.image_transform(224, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)
    ours = build_eval_transform({"input_size": (3, 224, 224), "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "crop_pct": 1.0})
    img = photo(*size)
    torch.testing.assert_close(ours(img), theirs(img), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(640, 480), (333, 500)])
def test_equals_timm_eval_transform(size):
    timm = oracle("timm")
    from timm.data import create_transform

    theirs = create_transform(input_size=(3, 224, 224), is_training=False, interpolation="bilinear", crop_pct=0.875)
    ours = build_eval_transform({"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875})
    assert timm is not None
    img = photo(*size, seed=1)
    torch.testing.assert_close(ours(img), theirs(img), atol=1e-5, rtol=0)


def test_a_square_input_size_keeps_the_aspect_ratio():
    # the left and right quarters of a wide image are cropped away, not squeezed in
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 100, 200))  # a white left quarter
    out = build_eval_transform({"input_size": (3, 64, 64), "mean": (0, 0, 0), "std": (1, 1, 1), "crop_pct": 1.0})(img)
    assert out.shape == (3, 64, 64) and out[:, :, 2:].max() < 0.05  # (interpolation reaches one pixel past the edge)

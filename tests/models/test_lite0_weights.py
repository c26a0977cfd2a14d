"""The packaged EfficientNet-Lite0 ImageNet weights, mapped by position onto timm's layout."""

import os
from collections import OrderedDict

import pytest
import torch

import models
from models import lite0_weights_path, load_lite0_weights, load_state_dict_by_position
from tests.helpers import oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def classifier() -> torch.nn.Module:
    import timm

    return load_lite0_weights(timm.create_model("tf_efficientnet_lite0")).eval()


def top5(model: torch.nn.Module, image) -> list:
    from PIL import Image
    from timm.data import create_transform

    cfg = models.create_encoder("lite0-128", pretrained=False).data_config  # the preset's preprocessing
    transform = create_transform(**cfg)
    with torch.no_grad():
        logits = model(transform(Image.fromarray(image))[None])
    return logits.softmax(-1)[0].topk(5).indices.tolist()


def test_packaged_file_exists() -> None:
    path = lite0_weights_path()
    assert path.endswith(".pth") and os.path.getsize(path) > 10_000_000


def test_imagenet_classes_of_shipped_photos(classifier: torch.nn.Module) -> None:
    skimage_data = oracle("skimage.data")
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    coffee = top5(classifier, skimage_data.coffee())
    cat = top5(classifier, skimage_data.chelsea())
    names = lambda ids: [info.index_to_description(i) for i in ids]  # noqa: E731
    assert coffee[0] in (967, 968) and {967, 968} <= set(coffee), names(coffee)  # espresso, cup
    assert set(cat[:3]) == {281, 282, 285}, names(cat)  # tabby, tiger cat, Egyptian cat


def test_preset_features_are_the_classifier_features(classifier: torch.nn.Module) -> None:
    enc = models.create_encoder("lite0-128", embed_dim=None, normalize=False).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = classifier.forward_head(classifier.forward_features(x), pre_logits=True)
        torch.testing.assert_close(enc(x), expected)


def test_grayscale_stem_equals_rgb_on_replicated_gray() -> None:
    rgb = models.create_encoder("lite0-128", img_size=64).eval()
    gray = models.create_encoder("lite0-128", img_size=64, in_chans=1).eval()
    gray.head.load_state_dict(rgb.head.state_dict())
    assert gray.data_config["input_size"] == (1, 64, 64) and gray.data_config["mean"] == models.LITE0_MEAN[:1]
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gray(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_mismatches_name_the_first_bad_tensor() -> None:
    import timm

    first_bad = r"'_fc.weight' has shape \(1000, 1280\) but model tensor 'classifier.weight' expects \(10, 1280\)"
    with pytest.raises(ValueError, match=first_bad):
        load_lite0_weights(timm.create_model("tf_efficientnet_lite0", num_classes=10))
    with pytest.raises(ValueError, match="fit timm 'tf_efficientnet_lite0'"):
        load_lite0_weights(timm.create_model("efficientnet_lite0"))  # same shapes, other padding
    source = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    with pytest.raises(ValueError, match="296 tensors but ResNet has"):
        load_state_dict_by_position(timm.create_model("resnet18"), source)


def test_by_position_ignores_names_and_checks_shapes() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    gen = torch.Generator().manual_seed(2)
    tensors = [torch.randn(*shape, generator=gen) for shape in ((4, 3), (4,), (2, 4), (2,))]
    load_state_dict_by_position(model, OrderedDict(zip("abcd", tensors)))
    for got, want in zip(model.state_dict().values(), tensors):
        assert torch.equal(got, want)
    bad = OrderedDict(zip("abcd", [tensors[0], tensors[1], torch.zeros(4, 2), tensors[3]]))
    first_bad = r"tensor #2 'c' has shape \(4, 2\) but model tensor '1.weight' expects \(2, 4\)"
    with pytest.raises(ValueError, match=first_bad):
        load_state_dict_by_position(model, bad, "src")

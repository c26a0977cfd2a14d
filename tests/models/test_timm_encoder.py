"""TimmEncoder and every registered image preset, built with random weights (no hub)."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import TimmEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMAGE_PRESETS = [i["name"] for i in models.list_encoders() if i["modality"] == "image"]
SIZE = 32  # smallest side every preset accepts (ViT-S/16 is rebuilt for it: 2 x 2 patches)
DATA_KEYS = {"input_size", "mean", "std", "interpolation", "crop_pct"}
_cache: dict = {}


def built(name: str) -> nn.Module:
    """One eval-mode random-weight build per preset for the read-only checks."""
    if name not in _cache:
        _cache[name] = models.create_encoder(name, pretrained=False, img_size=SIZE).eval()
    return _cache[name]


def batch(seed: int, chans: int = 3, size: int = SIZE, n: int = 3) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def batch_norms(module: nn.Module) -> list:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_preset_output_shape_norm_and_data_config(name: str) -> None:
    enc = built(name)
    info = models.get_preset_info(name)
    assert enc.embed_dim == info.embed_dim
    assert DATA_KEYS <= set(enc.data_config)
    assert enc.data_config["input_size"] == (3, SIZE, SIZE)
    assert len(enc.data_config["mean"]) == len(enc.data_config["std"]) == 3
    with torch.no_grad():
        for seed in (0, 1):
            emb = enc(batch(seed))
            assert emb.shape == (3, info.embed_dim)
            torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_preset_forward_is_head_of_features(name: str) -> None:
    enc = built(name)
    with torch.no_grad():
        for seed in (2, 3):
            x = batch(seed)
            feats = enc.forward_features(x)
            assert feats.dim() in (3, 4) and feats.shape[0] == 3
            torch.testing.assert_close(enc(x), enc.forward_head(feats), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", IMAGE_PRESETS)
def test_preset_freeze_bn_keeps_statistics(name: str) -> None:
    torch.manual_seed(0)
    enc = models.create_encoder(name, pretrained=False, img_size=SIZE, freeze_bn=True).train()
    bns = batch_norms(enc.backbone)
    before = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    enc(batch(4)).sum().backward()
    assert all(not b.training for b in bns)
    for b, (mean, var) in zip(bns, before):
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
        assert b.weight is None or (not b.weight.requires_grad and b.weight.grad is None)
    if bns:  # control: without the flag the same module does update its statistics
        enc.freeze_bn = False
        enc.train()
        mean = bns[0].running_mean.clone()
        enc(batch(4))
        assert bns[0].training and not torch.equal(bns[0].running_mean, mean)


def test_presets_ask_timm_for_hub_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    calls = []
    real = timm.create_model

    def record(name: str, pretrained: bool = False, **kwargs):  # no network here: build random
        calls.append((name, pretrained))
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", record)
    models.create_encoder("resnet50-512", img_size=SIZE)
    models.create_encoder("vit-s16-384", img_size=SIZE)
    models.create_encoder("lite0-128", img_size=SIZE)  # packaged file, never the hub
    assert calls == [
        ("resnet50.tv_in1k", True),
        ("vit_small_patch16_224.augreg_in21k_ft_in1k", True),
        ("tf_efficientnet_lite0", False),
    ]


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax"])
def test_pooling_matches_brute_force(pool: str) -> None:
    torch.manual_seed(0)
    enc = TimmEncoder("resnet18", embed_dim=None, pool=pool, normalize=False).eval()
    with torch.no_grad():
        for seed in (5, 6):
            x = batch(seed, size=64)
            f = enc.forward_features(x).double()
            avg, mx = f.mean(dim=(2, 3)), f.amax(dim=(2, 3))
            expected = {"avg": avg, "max": mx, "avgmax": 0.5 * (avg + mx), "catavgmax": torch.cat([avg, mx], 1)}[pool]
            assert enc.embed_dim == enc.num_features == expected.shape[1]
            torch.testing.assert_close(enc(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_linear_head_bn_and_normalisation_match_brute_force() -> None:
    torch.manual_seed(0)
    enc = TimmEncoder("resnet18", embed_dim=16, head_bn=True, normalize=True).eval()
    raw = TimmEncoder("resnet18", embed_dim=16, normalize=False).eval()
    with torch.no_grad():
        enc.head.bn.running_mean.normal_()
        enc.head.bn.running_var.uniform_(0.5, 2.0)
        for seed in (7, 8):
            x = batch(seed, size=64)
            pooled = enc.forward_features(x).double().mean(dim=(2, 3))
            z = F.linear(pooled, enc.head.fc.weight.double(), enc.head.fc.bias.double())
            bn = enc.head.bn
            z = (z - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps)
            z = z * bn.weight.double() + bn.bias.double()
            torch.testing.assert_close(enc(x).double(), z / z.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-5)
            assert (raw(x).norm(dim=1) - 1).abs().max() > 1e-3  # normalize=False really is raw


def test_head_bn_still_trains_under_freeze_bn() -> None:
    enc = TimmEncoder("resnet18", embed_dim=8, head_bn=True, freeze_bn=True).train()
    mean = enc.head.bn.running_mean.clone()
    enc(batch(9))
    assert enc.head.bn.training and not torch.equal(enc.head.bn.running_mean, mean)
    enc.eval().train()
    assert not enc.backbone.bn1.training  # train() after eval() keeps the backbone frozen


@pytest.mark.parametrize("embed_dim", [None, 0])
def test_no_head_gives_pooled_features(embed_dim) -> None:
    enc = TimmEncoder("resnet18", embed_dim=embed_dim).eval()
    assert enc.embed_dim == 512 and len(enc.head) == 0
    assert enc(batch(10)).shape == (3, 512)


def test_weights_file_round_trip_and_grayscale(tmp_path) -> None:
    torch.manual_seed(0)
    src = TimmEncoder("resnet18", embed_dim=8).eval()
    for p in src.backbone.parameters():  # not the default init, so a silent non-load would show
        p.data.normal_(0, 0.05)
    state = {**src.backbone.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.zeros(1000)}
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state}, path)
    dst = TimmEncoder("resnet18", embed_dim=8, weights=str(path)).eval()
    for key, val in src.backbone.state_dict().items():
        assert torch.equal(dst.backbone.state_dict()[key], val), key

    gray = TimmEncoder("resnet18", embed_dim=8, in_chans=1, weights=str(path)).eval()
    assert gray.data_config["input_size"] == (1, 224, 224) and len(gray.data_config["mean"]) == 1
    with torch.no_grad():
        x = batch(11, chans=1, size=64)
        torch.testing.assert_close(
            gray.forward_features(x), src.forward_features(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-4
        )


def test_bad_weights_and_arguments_are_named(tmp_path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit timm model 'resnet18'.*missing"):
        TimmEncoder("resnet18", weights=str(wrong))
    other = tmp_path / "resnet34.pth"
    torch.save(TimmEncoder("resnet34", embed_dim=None).backbone.state_dict(), other)
    with pytest.raises(ValueError, match="does not fit"):
        TimmEncoder("resnet18", weights=str(other))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        TimmEncoder("resnet18", weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="either pretrained"):
        TimmEncoder("resnet18", pretrained=True, weights=str(other))
    with pytest.raises(ValueError, match="no model named 'resnet-18'"):
        TimmEncoder("resnet-18")
    with pytest.raises(ValueError, match="pool='bogus'"):
        TimmEncoder("resnet18", pool="bogus")
    with pytest.raises(ValueError, match="mean has 3 values"):
        TimmEncoder("resnet18", in_chans=1, mean=(0.5, 0.5, 0.5), std=(0.5,))

"""The preset registry: lookup, errors, listing without building, fast import."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch.nn as nn

import models
from models import registry

REPO = Path(__file__).resolve().parents[2]


def test_list_encoders_has_the_required_presets_as_data() -> None:
    infos = {info["name"]: info for info in models.list_encoders()}
    assert {"lite0-128", "resnet50-512", "vit-s16-384"} <= set(infos)
    assert infos["lite0-128"]["embed_dim"] == 128 and infos["lite0-128"]["weights"].startswith("packaged")
    assert infos["resnet50-512"]["embed_dim"] == 512 and infos["resnet50-512"]["weights"].startswith("hub")
    assert infos["vit-s16-384"]["embed_dim"] == 384
    assert all(set(i) == {"name", "embed_dim", "weights", "modality", "description"} for i in infos.values())
    assert [i["name"] for i in models.list_encoders()] == sorted(infos)


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(ValueError) as err:
        models.create_encoder("lite0-12")
    msg = str(err.value)
    assert "lite0-12" in msg and "did you mean 'lite0-128'" in msg
    for info in models.list_encoders():
        assert info["name"] in msg


def test_module_passes_through_and_rejects_overrides() -> None:
    module = nn.Linear(2, 2)
    assert models.create_encoder(module) is module
    with pytest.raises(ValueError, match="overrides"):
        models.create_encoder(module, embed_dim=3)
    with pytest.raises(TypeError, match="preset name"):
        models.create_encoder(3)  # type: ignore[arg-type]


def test_register_builds_with_overrides_and_rejects_clashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_PRESETS", dict(registry._PRESETS))

    @models.register_encoder("tiny-test", embed_dim=4, weights="random")
    def tiny(width: int = 4) -> nn.Module:
        return nn.Linear(3, width)

    assert models.create_encoder("tiny-test").out_features == 4
    assert models.create_encoder("tiny-test", width=7).out_features == 7
    assert models.preset("tiny-test", {"width": 5}).out_features == 5
    assert "tiny-test" in [i["name"] for i in models.list_encoders()]
    models.register_encoder("tiny-test", embed_dim=4, weights="random")(tiny)  # re-import: fine

    def other() -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        models.register_encoder("tiny-test", embed_dim=4, weights="random")(other)
    with pytest.raises(ValueError, match="embed_dim"):
        models.register_encoder("bad", embed_dim=0, weights="random")


def test_import_models_does_not_import_timm() -> None:
    code = "import sys, models; models.list_encoders(); assert 'timm' not in sys.modules, 'timm imported'"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

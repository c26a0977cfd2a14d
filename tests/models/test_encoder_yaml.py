"""Encoders from YAML: ``class_path: models.TimmEncoder`` and ``class_path: models.preset``."""

import os

import pytest
import torch
import torch.nn as nn
import yaml

from models import TimmEncoder
from tests.helpers import oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TIMM_YAML = """
encoder:
  class_path: models.TimmEncoder
  init_args:
    model_name: resnet18
    embed_dim: 16
    pool: avgmax
    freeze_bn: true
    img_size: 32
"""
PRESET_YAML = """
encoder:
  class_path: models.preset
  init_args:
    name: lite0-128
    overrides: {pretrained: false, img_size: 64, embed_dim: 32}
"""


def parse(text: str) -> nn.Module:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=nn.Module)
    return parser.instantiate(parser.parse_object(yaml.safe_load(text))).encoder


def test_timm_encoder_from_yaml() -> None:
    enc = parse(TIMM_YAML)
    assert isinstance(enc, TimmEncoder) and enc.embed_dim == 16 and enc.freeze_bn
    assert enc.data_config["input_size"] == (3, 32, 32)


def test_preset_from_yaml() -> None:
    enc = parse(PRESET_YAML)
    assert isinstance(enc, TimmEncoder) and enc.model_name == "tf_efficientnet_lite0"
    assert enc.embed_dim == 32 and enc.data_config["input_size"] == (3, 64, 64)
    assert enc.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 32)


def test_yaml_typos_are_rejected() -> None:
    with pytest.raises(Exception, match="embed_dimm"):
        parse(TIMM_YAML.replace("embed_dim:", "embed_dimm:"))



def test_lightning_cli_builds_a_preset(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    oracle("lightning")
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    class Module(L.LightningModule):
        def __init__(self, encoder: nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

    config = tmp_path / "config.yaml"
    body = yaml.safe_load(PRESET_YAML)
    config.write_text(yaml.safe_dump({"model": body, "trainer": {"logger": False, "enable_checkpointing": False}}))
    monkeypatch.setattr("sys.argv", ["hardneg"])
    cli = LightningCLI(
        Module, run=False, args=["--config", str(config)], save_config_callback=None, seed_everything_default=0
    )
    assert isinstance(cli.model.encoder, TimmEncoder) and cli.model.encoder.embed_dim == 32

"""Every ``experiments/loss/*.yaml`` fragment instantiates through jsonargparse (as LightningCLI does),
and every exported loss has a fragment."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from tests.helpers import oracle

jsonargparse = oracle("jsonargparse")

import losses  # noqa: E402
from losses import BaseLoss  # noqa: E402

FRAGMENTS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "loss").glob("*.yaml"))


def loss_spec(path: Path) -> dict:
    return yaml.safe_load(path.read_text())["model"]["loss"]


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.stem)
def test_fragment_instantiates(path: Path) -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(BaseLoss, "loss")
    cfg = parser.parse_object({"loss": loss_spec(path)})
    loss = parser.instantiate_classes(cfg).loss
    assert isinstance(loss, BaseLoss)
    for name, value in loss_spec(path).get("init_args", {}).items():
        assert getattr(loss, name) == value


def test_every_loss_has_a_fragment() -> None:
    configured = {loss_spec(p)["class_path"] for p in FRAGMENTS}
    classes = [getattr(losses, n) for n in losses.__all__]
    exported = {f"losses.{c.__name__}" for c in classes if inspect.isclass(c) and issubclass(c, BaseLoss) and c is not BaseLoss}
    assert exported <= configured, f"no experiments/loss fragment for {sorted(exported - configured)}"

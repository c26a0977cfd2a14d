"""Every paper recipe (``experiments/recipes/*.yaml``) instantiates and runs one ``fast_dev_run`` step
on a miniature copy of its benchmark's official format.

Overrides make it fast and offline: 32 x 32 images, P x K = 2 x 2, no hub weights
(``pretrained: false`` merged into the recipe's encoder overrides), no DataLoader workers.
Everything else (loss, miner, optimizer, scheduler, callbacks, gradient clipping) is the recipe's.
"""

import json
from pathlib import Path

import pytest

from experiments.lightning_cli import load_config
from tests.datamodules.miniature import miniature_cli_args
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "experiments" / "recipes").glob("*.yaml"))  # not the parts in metrix/, mlrc/

FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.accelerator=cpu",
    "--data.init_args.image_size=32",
    "--data.init_args.classes_per_batch=2",
    "--data.init_args.samples_per_class=2",
    "--data.init_args.eval_batch_size=64",
    "--data.init_args.num_workers=0",
]


def encoder_overrides(recipe: dict) -> list[str]:
    """Keep the recipe's preset overrides and add ``pretrained: false`` (no hub access in tests)."""
    encoder = recipe["model"]["init_args"]["encoder"]
    if encoder.get("class_path") != "models.preset":
        return []
    overrides = {**(encoder.get("init_args", {}).get("overrides") or {}), "pretrained": False}
    return [f"--model.init_args.encoder.init_args.overrides={json.dumps(overrides)}"]


def no_checkpoint(recipe: dict) -> list[str]:
    """Lightning 2.6 still writes ``last.ckpt`` at the end of a ``fast_dev_run`` (100 MB for ResNet-50):
    turn checkpointing off unless the recipe configures its own checkpoint callback."""
    callbacks = (recipe.get("trainer") or {}).get("callbacks") or []
    own = any("Checkpoint" in c.get("class_path", "") for c in callbacks)
    return [] if own else ["--trainer.enable_checkpointing=false"]


def test_there_are_recipes():
    assert len(RECIPES) >= 12, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_fast_dev_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a recipe's relative paths (runs/...) land in the temporary folder
    recipe = load_config(path)  # resolved: a recipe lists its parts
    data = miniature_cli_args(recipe["data"]["class_path"], tmp_path / "data")
    argv = ["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run'}", *FAST, *data, *encoder_overrides(recipe), *no_checkpoint(recipe)]
    run_cli(argv)  # finished, stepped, finite loss

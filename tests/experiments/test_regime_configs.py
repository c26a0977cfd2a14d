"""The text and image-text run configs (``experiments/text/``, ``experiments/clip/``) run one
``fast_dev_run`` step as written, on shrunken data: WordNet with a small batch and the packaged
MiniLM; the Fashion-MNIST scenes generated small into a temporary folder at 32 px (CLIP, and the
SigLIP fragment on top)."""

from pathlib import Path

import pytest

from datamodules.fashion_mnist import DEBIAN_ROOT
from tests.helpers import require_path, run_cli

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--trainer.fast_dev_run=true", "--trainer.enable_progress_bar=false", "--data.init_args.num_workers=0"]


@pytest.mark.slow
def test_wordnet_config(tmp_path):
    require_path(Path("/usr/share/wordnet/data.noun"), "Debian package wordnet-base")
    run_cli(["fit", "--config", str(ROOT / "experiments/text/wordnet_minilm.yaml"), f"--trainer.default_root_dir={tmp_path}", *FAST,
             "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8"])


@pytest.mark.slow
@pytest.mark.parametrize("fragments", [[], ["experiments/clip/siglip.yaml"], ["experiments/clip/negclip.yaml"], ["experiments/clip/tripletclip.yaml"]],
                         ids=["clip", "siglip", "negclip", "tripletclip"])
def test_scenes_config(tmp_path, fragments):
    require_path(Path(DEBIAN_ROOT), "Debian package dataset-fashion-mnist")
    argv = ["fit", "--config", str(ROOT / "experiments/clip/fashion_scenes.yaml")]
    for f in fragments:
        argv += ["--config", str(ROOT / f)]
    run_cli([*argv, f"--trainer.default_root_dir={tmp_path}", *FAST, f"--data.init_args.root={tmp_path / 'scenes'}",
             "--data.init_args.n_train=48", "--data.init_args.n_test=12", "--data.init_args.shard_size=16", "--data.init_args.batch_size=4",
             "--data.init_args.image_size=32", "--data.init_args.zero_shot_size=20", "--data.init_args.eval_batch_size=16",
             "--model.init_args.model.init_args.overrides.image_size=32"])


def test_scenes_config_evaluates_zero_shot_as_written():
    """jsonargparse passes a parent's defaults explicitly: the scenes DataModule's own default must hold."""
    from experiments.lightning_cli import load_config
    from jsonargparse import ArgumentParser

    from datamodules import FashionScenesDataModule

    parser = ArgumentParser()
    parser.add_subclass_arguments(FashionScenesDataModule, "data")
    data = load_config(ROOT / "experiments/clip/fashion_scenes.yaml")["data"]
    dm = parser.instantiate_classes(parser.parse_object({"data": data})).data
    assert dm.zero_shot == "fashion_mnist" and dm.zero_shot_classes

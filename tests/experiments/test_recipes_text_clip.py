"""The text and image-text paper recipes (``experiments/recipes/msmarco/``, ``clip/``, ``compositional/``)
instantiate and run one ``fast_dev_run`` step on miniature data, offline.

``tests/experiments/test_recipes.py`` globs only the top level of ``experiments/recipes/``; these folders
keep their shared parts in ``<folder>/parts/``, and every other YAML file of a folder is a recipe.

Overrides make a run fast and offline, and nothing else: the MS MARCO recipes read ``make_msmarco``'s
miniature copy of the official files with the packaged ``minilm-l6`` encoder in place of the hub preset
(the recipe's pooling/normalisation overrides kept, 32 tokens, 4 queries per batch); the CLIP recipes read
generated Fashion-MNIST scene shards with the offline ``lite0-minilm-clip`` model at 32 x 32
in place of ViT-B/32. CPU, one device, bf16 autocast instead of fp16 (fp16 autocast is CUDA-only). The
loss, hard-negative mode, gather mode, optimiser, scheduler and negative source stay the recipe's, which
``test_recipe_fast_dev_run`` checks on the built objects after the step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments.lightning_cli import load_config
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = ROOT / "experiments" / "recipes"
FOLDERS = ("msmarco", "clip", "compositional")
RECIPES = sorted(p for folder in FOLDERS for p in (RECIPE_DIR / folder).glob("*.yaml"))  # parts live in <folder>/parts/
DOCS = ROOT / "docs" / "recipes.md"

FAST = [
    "--trainer.fast_dev_run=true",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=bf16-mixed",
]


def recipe_id(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.fixture(scope="module")
def marco(tmp_path_factory) -> Path:
    from tests.datamodules.test_msmarco import make_msmarco

    root = tmp_path_factory.mktemp("msmarco")
    make_msmarco(root)
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from datamodules.fashion_mnist import DEBIAN_ROOT
    from datamodules.fashion_scenes import generate_scenes
    from tests.helpers import require_path

    require_path(DEBIAN_ROOT, "Fashion-MNIST (Debian dataset-fashion-mnist)")
    return generate_scenes(tmp_path_factory.mktemp("scenes"), n_train=16, n_test=8, shard_size=8, with_negatives=True, image_size=56)


def text_overrides(recipe: dict, marco: Path) -> list[str]:
    """The packaged MiniLM in place of the recipe's preset (its other overrides kept), 32 tokens, a small batch."""
    encoder = recipe["model"]["init_args"]["query_encoder"]["init_args"]
    overrides = {**(encoder.get("overrides") or {}), "max_length": 32}
    return [
        "--model.init_args.query_encoder.init_args.name=minilm-l6",
        f"--model.init_args.query_encoder.init_args.overrides={json.dumps(overrides)}",
        f"--data.init_args.root={marco}",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.num_workers=0",
    ]


def clip_overrides(recipe: dict, scenes) -> list[str]:
    """The offline Lite0 + MiniLM CLIP at 32 x 32 in place of ViT-B/32, on scene shards. (A CSV source, as
    negclip_coco.yaml names, is refused by the pre-flight check with the Lite0 trunk: it reads the CSV's
    distinct-image ids as classes and asks for num_classes; reported, experiments/preflight.py.)"""
    model = {"class_path": "models.preset", "init_args": {"name": "lite0-minilm-clip", "overrides": {"pretrained": False, "image_size": 32, "context_length": 32}}}
    train, test = scenes.train_shards, scenes.test_shards
    return [
        f"--model.init_args.model={json.dumps(model)}",
        f"--data.init_args.train={train}",
        f"--data.init_args.test={test}",
        "--data.init_args.num_samples=null",
        "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=64",  # fast_dev_run evaluates one batch: every test image and caption in it
        "--data.init_args.image_size=32",
        "--data.init_args.num_workers=0",
    ]


def test_there_are_recipes_in_every_folder():
    assert {p.parent.name for p in RECIPES} == set(FOLDERS), RECIPES
    assert len(RECIPES) >= 6, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=recipe_id)
def test_recipe_fast_dev_run(path, tmp_path, monkeypatch, marco, scenes):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a recipe's relative paths (runs/...) land in the temporary folder
    recipe = load_config(path)
    init = recipe["model"]["init_args"]
    text = recipe["model"]["class_path"].endswith("DualEncoderModule")
    data = text_overrides(recipe, marco) if text else clip_overrides(recipe, scenes)
    trainer = run_cli(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path / 'run'}", *FAST, *data])  # finished, stepped, finite loss

    module = trainer.lightning_module
    # the recipe's components, not the test's: loss, optimiser, scheduler, negatives
    assert type(module.loss).__name__ == init["loss"]["class_path"].rsplit(".", 1)[1]
    assert module.loss.symmetric == (init["loss"].get("init_args") or {}).get("symmetric", True)
    optimizer = trainer.optimizers[0]
    assert type(optimizer).__name__ == init["optimizer"]["class_path"].rsplit(".", 1)[1]
    for key, value in init["optimizer"]["init_args"].items():
        got = optimizer.defaults[key]
        assert (list(got) if isinstance(got, tuple) else got) == pytest.approx(value), key
    schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
    assert [type(s).__name__ for s in schedulers] == ([init["scheduler"]["class_path"].rsplit(".", 1)[1]] if init.get("scheduler") else [])
    if text:
        assert float(module.logit_scale.exp()) == pytest.approx(1.0 / init["temperature"])
        assert module.hparams.eval_distance == init.get("eval_distance", "cosine")
        dm = trainer.datamodule
        assert dm.train_negatives == recipe["data"]["init_args"]["train_negatives"]
        assert dm.num_negatives == recipe["data"]["init_args"]["num_negatives"]
        encoder = module.query_encoder
        for key, value in (init["query_encoder"]["init_args"].get("overrides") or {}).items():
            if key != "max_length":
                assert getattr(encoder, key) == value, key
    else:
        assert module.hparams.hard_negatives == init.get("hard_negatives", "none")
        assert module.step.gather == init.get("gather", "local")


def test_docs_list_every_recipe_and_its_source():
    """docs/recipes.md has a row per recipe file (the published numbers sit beside it)."""
    text = DOCS.read_text()
    missing = [recipe_id(p) for p in RECIPES if f"{recipe_id(p)}.yaml" not in text]
    assert not missing, f"docs/recipes.md does not list {missing}"


def test_msmarco_recipe_names_a_missing_negatives_file(marco, tmp_path):
    """The BM25 recipe's data settings on a folder without the sentence-transformers file: the error names it."""
    from datamodules.msmarco import MSMARCOPassageDataModule

    for name in ("collection.tsv", "queries.train.tsv", "qrels.train.tsv", "queries.dev.small.tsv", "qrels.dev.small.tsv"):
        (tmp_path / name).write_bytes((marco / name).read_bytes())
    data = load_config(RECIPE_DIR / "msmarco" / "minilm_bm25.yaml")["data"]["init_args"]
    data = {**data, "root": str(tmp_path), "num_workers": 0, "data_config": {"tokenizer": lambda texts, **kw: {"input_ids": torch.ones(len(texts), 2)}}}
    dm = MSMARCOPassageDataModule(**data)
    with pytest.raises(FileNotFoundError, match="msmarco-hard-negatives.jsonl.gz"):
        dm.setup("fit")

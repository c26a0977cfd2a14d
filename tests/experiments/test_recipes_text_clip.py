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
MARCO: dict = {}  # what make_msmarco wrote (qids, qrels, negative lists), for the stand-ins

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
    MARCO.update(make_msmarco(root))
    return root


def text_stand_ins(recipe: dict, marco: Path) -> list[str]:
    """Offline stand-ins for what a text recipe reads besides the miniature's official files: a hub teacher
    scored from a generated {qid: {pid: score}} file, a hub guide replaced by the packaged MiniLM, a mined
    negatives file (named by the recipe) written from the miniature's BM25 lists under the recipe's system."""
    import gzip
    import pickle

    from tests.datamodules.test_msmarco import N_PASSAGES

    init, data = recipe["model"]["init_args"], recipe["data"]["init_args"]
    args = []
    teacher = init.get("teacher") or {}
    if teacher.get("class_path", "").endswith("FileScorer"):
        path = marco / "teacher-scores.pkl.gz"
        generator = torch.Generator().manual_seed(0)
        scores = {q: {p: float(torch.randn((), generator=generator)) for p in range(N_PASSAGES)} for q in MARCO["train_qids"]}
        with gzip.open(path, "wb") as f:
            pickle.dump(scores, f)
        args.append(f"--model.init_args.teacher.init_args.path={path}")
    if init.get("guide"):
        guide = {"class_path": "models.preset", "init_args": {"name": "minilm-l6", "overrides": {"max_length": 32}}}  # replaces the hub guide's overrides too
        args.append(f"--model.init_args.guide.init_args.guide={json.dumps(guide)}")
    if data.get("negatives_file"):
        systems = data.get("negative_systems") or ["mined"]
        lines = [json.dumps({"qid": q, "pos": pos, "neg": {s: MARCO["negatives"][q] for s in systems}}) for q, pos in MARCO["train_qrels"].items()]
        (marco / data["negatives_file"]).write_text("\n".join(lines) + "\n")
    return args


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
    overrides = {**{k: v for k, v in (encoder.get("overrides") or {}).items() if k != "model_name_or_path"}, "max_length": 32}
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
    text = "query_encoder" in init  # DualEncoderModule and its subclasses (ADOREModule)
    data = [*text_overrides(recipe, marco), *text_stand_ins(recipe, marco)] if text else clip_overrides(recipe, scenes)
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
            if key not in ("max_length", "model_name_or_path"):
                assert getattr(encoder, key) == value, key
        # the negative source beyond the file: the sampler, an ANN refresh, ADORE's retrieval, a guide, a teacher's loss
        sampler = (recipe["data"]["init_args"].get("negative_sampler") or {}).get("class_path", "miners.negative_samplers.UniformSampler")
        assert type(dm.negative_sampler).__name__ == sampler.rsplit(".", 1)[1]
        for name in ("distillation_loss", "guide"):
            assert type(getattr(module, name, None)).__name__ == (init[name]["class_path"].rsplit(".", 1)[1] if init.get(name) else "NoneType"), name
        refresh = [c for c in recipe["trainer"].get("callbacks") or [] if c["class_path"].endswith("ANNRefresh")]
        built = [c for c in trainer.callbacks if type(c).__name__ == "ANNRefresh"]
        assert len(built) == len(refresh)
        for spec, callback in zip(refresh, built):
            for key in ("every_n_epochs", "every_n_steps", "top_k", "first", "skip_top", "distance"):
                assert getattr(callback, key) == spec["init_args"][key], key
            assert callback.history, "the refresh at fit start ran"
        if recipe["model"]["class_path"].endswith("ADOREModule"):
            assert module.num_negatives == init["num_negatives"] and module.index is not None
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

"""The guide/teacher fragments of ``experiments/mining/`` build their components (class_path/init_args,
as LightningCLI would), and those components run on a few texts. A full ``hardneg fit`` of each on
top of ``experiments/text/wordnet_minilm.yaml`` takes about 90 s (MiniLM on CPU) and is left to the
config matrix."""

from importlib import import_module
from pathlib import Path

import pytest
import torch
import yaml

from losses.distillation import KLDistillationLoss, MarginMSELoss
from miners.guided_filter import GuidedFilter
from models.scorers import BiEncoderScorer

MINING = Path(__file__).resolve().parents[2] / "experiments" / "mining"


def build(spec):
    """Instantiate a ``{class_path, init_args}`` tree."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        return getattr(import_module(module), name)(**{k: build(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec


def model_args(name):
    return yaml.safe_load((MINING / name).read_text())["model"]["init_args"]


@pytest.fixture(scope="module")
def minilm():
    from models import create_encoder

    return create_encoder("minilm-l6")


def test_guided_fragment(minilm, monkeypatch):
    args = model_args("guided.yaml")
    monkeypatch.setattr("models.preset", lambda name, overrides=None: minilm)  # one load for the module
    guide = build(args["guide"])
    assert isinstance(guide, GuidedFilter) and guide.mode == "absolute"
    q = guide.encode(["a small domesticated feline", "a large body of salt water"])
    c = guide.encode(["cat", "ocean", "house cat"])
    mask = guide(q, c, torch.tensor([0, 1]))
    assert mask.tolist() == [[False, False, True], [False, False, False]]  # "house cat" outscores "cat" for the feline query


@pytest.mark.parametrize("name,loss_class", [("teacher_kl.yaml", KLDistillationLoss), ("margin_mse.yaml", MarginMSELoss)])
def test_teacher_fragments(minilm, monkeypatch, name, loss_class):
    args = model_args(name)
    monkeypatch.setattr("models.preset", lambda name, overrides=None: minilm)
    teacher, loss = build(args["teacher"]), build(args["distillation_loss"])
    assert isinstance(teacher, BiEncoderScorer) and isinstance(loss, loss_class)
    scores = teacher.score(["a small domesticated feline"], [["cat", "ocean", "spreadsheet"]])
    assert scores.shape == (1, 3) and scores[0, 0] > scores[0, 1:].max()
    assert torch.isfinite(loss(torch.randn(1, 3), scores))

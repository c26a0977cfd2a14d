"""The ANN/SimANS/TopK-PercPos/ADORE fragments of ``experiments/mining/`` run through the real CLI
(``hardneg fit`` with ``fast_dev_run``) on top of a seconds-long text run config (the tiny query/document
data and a character-bag encoder), and build the components their comments promise."""

from pathlib import Path

import pytest
import yaml

from experiments.callbacks.ann_refresh import ANNRefresh
from lightning_modules.adore_module import ADOREModule
from miners.negative_samplers import PositiveAwareFilter, SimANSSampler, TopKSampler, UniformSampler
from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
MINING = ROOT / "experiments" / "mining"

TINY_TEXT = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_val_batches": 0, "logger": False},
    "model": {
        "class_path": "lightning_modules.DualEncoderModule",
        "init_args": {
            "query_encoder": {"class_path": "tests.lightning_modules.test_dual_encoder_module.CharBagEncoder"},
            "loss": {"class_path": "losses.CLIPLoss", "init_args": {"symmetric": False}},
            "eval_ks": [1, 5],
        },
    },
    "data": {"class_path": "tests.datamodules.test_query_doc.TinyQueryDoc", "init_args": {"batch_size": 4, "num_workers": 0}},
}


def fit(tmp_path, *fragments, extra=()):
    base = tmp_path / "tiny_text.yaml"
    base.write_text(yaml.safe_dump(TINY_TEXT))
    argv = ["fit", "--config", str(base)]
    for name in fragments:
        argv += ["--config", str(MINING / name)]
    argv += ["--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false", *extra]
    return run_cli(argv)


def refresh_of(trainer):
    (cb,) = [c for c in trainer.callbacks if isinstance(c, ANNRefresh)]
    return cb


def test_ann_refresh_fragment(tmp_path):
    trainer = fit(tmp_path, "ann_refresh.yaml")
    cb = refresh_of(trainer)
    assert (cb.top_k, cb.first, cb.every_n_epochs) == (200, "untrained", 1) and len(cb.history) == 1
    dm = trainer.datamodule
    assert isinstance(dm.negative_sampler, UniformSampler) and dm.num_negatives == 1 and dm.candidate_store.version == 1


@pytest.mark.parametrize("name,sampler", [("simans.yaml", SimANSSampler), ("topk_percpos.yaml", PositiveAwareFilter)])
def test_sampler_fragments_on_top_of_ann_refresh(tmp_path, name, sampler):
    trainer = fit(tmp_path, "ann_refresh.yaml", name)
    dm = trainer.datamodule
    assert isinstance(dm.negative_sampler, sampler) and dm.candidate_store.version == 1
    if sampler is SimANSSampler:
        assert (dm.negative_sampler.a, dm.negative_sampler.b, dm.negative_sampler.top_k, dm.num_negatives) == (0.5, 0.0, 100, 7)
    else:
        assert dm.negative_sampler.relative_margin == 0.05 and isinstance(dm.negative_sampler.inner, TopKSampler) and dm.num_negatives == 4


def test_adore_fragment(tmp_path):
    trainer = fit(tmp_path, "adore.yaml")
    module = trainer.lightning_module
    assert isinstance(module, ADOREModule) and module.num_negatives == 8 and trainer.datamodule.num_negatives == 0
    assert module.corpus_embeddings is not None and not any(p.requires_grad for p in module.doc_encoder.parameters())

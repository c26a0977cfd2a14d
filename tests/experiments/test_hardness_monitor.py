"""HardnessMonitor: pair similarities against a brute-force loop, and its record of a real run."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.mined import Mined
from experiments.callbacks.hardness_monitor import HardnessMonitor, pair_similarities, summarize
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[2]


def cosine(u: torch.Tensor, v: torch.Tensor) -> float:
    return float(u @ v / (u.norm() * v.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pair_similarities_match_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(12, 5, generator=g, dtype=torch.float64)
    ref = torch.randn(9, 5, generator=g, dtype=torch.float64)
    a1, p = torch.randint(0, 12, (7,), generator=g), torch.randint(0, 9, (7,), generator=g)
    a2, n = torch.randint(0, 12, (11,), generator=g), torch.randint(0, 9, (11,), generator=g)
    ap, an = pair_similarities(emb, Mined.from_pairs(a1, p, a2, n), ref_emb=ref)
    assert ap.tolist() == pytest.approx([cosine(emb[i], ref[j]) for i, j in zip(a1, p)], abs=1e-6)
    assert an.tolist() == pytest.approx([cosine(emb[i], ref[j]) for i, j in zip(a2, n)], abs=1e-6)
    # Triplets give one (a, p) and one (a, n) pair each.
    a, p, n = (torch.randint(0, 12, (6,), generator=g) for _ in range(3))
    ap, an = pair_similarities(emb, Mined.from_triplets(a, p, n))
    assert ap.tolist() == pytest.approx([cosine(emb[i], emb[j]) for i, j in zip(a, p)], abs=1e-6)
    assert an.tolist() == pytest.approx([cosine(emb[i], emb[j]) for i, j in zip(a, n)], abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_summary_quantiles(seed):
    values = torch.randn(41, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    stats = summarize(values)
    # 41 values: every quantile position q * 40 is an integer, so all definitions agree.
    for q in (5, 25, 50, 75, 95):
        assert stats[f"q{q:02d}"] == pytest.approx(np.quantile(values.numpy(), q / 100))
    assert stats["n"] == 41 and stats["mean"] == pytest.approx(values.mean().item())
    assert summarize(torch.empty(0)) is None


def test_state_dict_round_trip():
    a = HardnessMonitor(bins=4)
    a.steps = [{"step": 1, "epoch": 0, "ap": {"n": 2}, "an": None}]
    a.histograms = {0: {"ap": [1, 0, 0, 1], "an": [0, 0, 0, 0]}}
    b = HardnessMonitor(bins=4)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # as stored in a checkpoint
    assert b.history() == a.history()


def test_records_the_mined_pairs_of_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    epochs, batches = 2, 3
    argv = [
        "fit", "--config", "tests/configs/digits_tiny.yaml",
        f"--trainer.max_epochs={epochs}", f"--data.init_args.num_batches={batches}",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=experiments.callbacks.HardnessMonitor",
        "--trainer.callbacks.init_args.bins=10",
    ]  # fmt: skip
    assert main(argv) == 0
    history = json.loads((tmp_path / "hardness.json").read_text())
    assert len(history["bin_edges"]) == 11
    assert [s["step"] for s in history["steps"]] == list(range(1, epochs * batches + 1))
    # digits_tiny: batch-hard mining on 5 classes x 4 samples gives one triplet per anchor.
    assert all(s["ap"]["n"] == 20 and s["an"]["n"] == 20 for s in history["steps"])
    assert all(-1 <= s[k][q] <= 1 for s in history["steps"] for k in ("ap", "an") for q in ("q05", "q50", "q95"))
    assert [e["epoch"] for e in history["epochs"]] == list(range(epochs))
    for e in history["epochs"]:
        assert sum(e["ap"]) == sum(e["an"]) == 20 * batches
    logged = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "hardness/ap_mean" in logged and "hardness/an_mean" in logged


def test_two_view_losses_are_monitored_on_every_valid_pair_of_their_masks(tmp_path):
    """CLIP-style losses take no miner: the monitor reads the step's relevance masks instead."""
    import warnings

    import lightning as L

    from experiments.callbacks import HardnessMonitor
    from lightning_modules.dual_encoder_module import DualEncoderModule
    from losses import CLIPLoss
    from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, datamodule, sgd

    monitor = HardnessMonitor()
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=tmp_path, callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd), datamodule=datamodule())
    assert len(monitor.steps) == 2
    # 4 queries: one positive each (plus the shared documents of TinyQueryDoc) against 4 documents and 8 negatives
    assert monitor.steps[0]["ap"]["n"] >= 4 and monitor.steps[0]["an"]["n"] > monitor.steps[0]["ap"]["n"]

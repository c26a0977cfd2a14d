"""DivergenceMonitor: collapse warnings and the stop before a non-finite step, with forced failures."""

import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from datamodules import DigitsDataModule
from experiments.cli import main
from experiments.callbacks.divergence_monitor import DivergenceError, DivergenceMonitor, EmbeddingCollapseWarning, embedding_spread, is_collapsed
from lightning_modules.metric_learning_module import MetricLearningModule
from losses import TripletMarginLoss
from miners import BatchHardMiner
from tests.helpers import TinyEncoder

ROOT = Path(__file__).resolve().parents[2]


class CollapsingEncoder(TinyEncoder):
    """``TinyEncoder`` whose training outputs collapse onto one direction during given training steps.

    ``collapse_steps`` counts training-mode forward calls (one per step), so evaluation does not shift it.
    """

    def __init__(self, collapse_steps: list[int] | None = None) -> None:
        super().__init__()
        self.collapse_steps = set(collapse_steps or [])
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.training:
            return out
        self.calls += 1
        if self.calls - 1 in self.collapse_steps:
            # As the lr=1e6 quickstart: one direction for all, plus a residual of almost no shape (rank 1).
            residual = torch.zeros_like(out)
            residual[:, 0] = out[:, 0]
            return torch.ones_like(out) + 1e-3 * residual
        return out


class FailingLoss(nn.Module):
    """Triplet margin loss that fails at its ``at_call``-th training call (0-based): a NaN loss
    (``mode="loss"``) or a finite loss whose gradients are NaN (``mode="grad"``: d sqrt(x)/dx at 0);
    under DDP on one ``rank`` only, when given."""

    def __init__(self, margin: float = 0.2, at_call: int = 0, mode: str = "loss", rank: int | None = None) -> None:
        super().__init__()
        self.loss = TripletMarginLoss(margin=margin)
        self.at_call, self.mode, self.rank, self.calls = at_call, mode, rank, 0

    def forward(self, emb, labels, mined=None, ref_emb=None, ref_labels=None):
        loss = self.loss(emb, labels, mined)
        self.calls += 1
        if self.calls - 1 != self.at_call or (self.rank is not None and torch.distributed.get_rank() != self.rank):
            return loss
        if self.mode == "loss":
            return loss * float("nan")
        return loss + torch.sqrt(emb.sum() * 0.0)


class Snapshot(L.Callback):
    """Keeps the parameters before each training step; on an exception saves them and the current ones."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_exception(self, trainer, pl_module, exception):
        now = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"before": self.before, "now": now, "step": trainer.global_step}, self.path)


class RecordingMonitor(DivergenceMonitor):
    """``DivergenceMonitor`` that writes each rank's ``DivergenceError`` to ``<out>.rank<r>``, then
    waits so that ``ddp_spawn`` does not terminate a slower rank before it writes its own."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out

    def on_before_backward(self, trainer, pl_module, loss):
        try:
            super().on_before_backward(trainer, pl_module, loss)
        except DivergenceError as err:
            Path(f"{self.out}.rank{trainer.global_rank}").write_text(str(err))
            time.sleep(3)
            raise


def digits_argv(root: Path, epochs: int, batches: int, *extra: str) -> list[str]:
    return [
        "fit", "--config", "tests/configs/digits_tiny.yaml",
        f"--trainer.max_epochs={epochs}", f"--data.init_args.num_batches={batches}",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={root}",
        *extra,
    ]  # fmt: skip


def collapse_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, EmbeddingCollapseWarning)]


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_spread_matches_its_definitions(seed):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(24, 7, generator=g, dtype=torch.float64) + 0.5
    spread, rank = embedding_spread(emb)
    q = torch.nn.functional.normalize(emb, dim=1)
    b = len(q)
    mean_cos = float(((q @ q.T).sum() - b) / (b * (b - 1)))
    assert float(spread) == pytest.approx((b - 1) / b * (1 - mean_cos), rel=1e-5)
    sigma = torch.linalg.svdvals(q - q.mean(0))
    p = sigma / sigma.sum()
    assert float(rank) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
    # Wide batches (B < D) go through the other Gram matrix.
    wide = torch.randn(5, 40, generator=g)
    sigma = torch.linalg.svdvals(torch.nn.functional.normalize(wide, dim=1) - torch.nn.functional.normalize(wide, dim=1).mean(0))
    p = sigma / sigma.sum()
    assert float(embedding_spread(wide)[1]) == pytest.approx(float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum())), rel=1e-4)
    collapsed = torch.ones(24, 7) + 1e-4 * emb.float()
    assert float(embedding_spread(collapsed)[0]) < 1e-7


def test_a_shrunken_batch_that_keeps_its_shape_is_not_collapsed():
    g = torch.Generator().manual_seed(0)
    structure = torch.randn(40, 128, generator=g)
    # As the quickstart at lr 3e-4 after 60 steps: a tiny cap, its 40 points still in general position.
    shrunk = torch.ones(128) + 1e-3 * structure
    spread, rank = (float(v) for v in embedding_spread(shrunk))
    assert spread < 1e-4 and rank > 0.3 * 39
    assert not is_collapsed(spread, rank, 40, 128, min_spread=1e-4, max_rank_fraction=0.3)
    # As the quickstart at lr 1e6: the same cap, with a residual of two directions only.
    flat = torch.ones(128) + 1e-3 * structure[:, :2] @ torch.randn(2, 128, generator=g)
    spread, rank = (float(v) for v in embedding_spread(flat))
    assert spread < 1e-4 and is_collapsed(spread, rank, 40, 128, min_spread=1e-4, max_rank_fraction=0.3)
    # Identical rows up to round-off have no shape to measure.
    assert is_collapsed(1e-12, 30.0, 40, 128, min_spread=1e-4, max_rank_fraction=0.3)
    assert not is_collapsed(0.2, 1.0, 40, 128, min_spread=1e-4, max_rank_fraction=0.3)


def test_collapse_warns_once_per_episode_naming_the_step(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    argv = digits_argv(
        tmp_path, 2, 4,
        "--model.init_args.encoder=tests.experiments.test_divergence.CollapsingEncoder",
        "--model.init_args.encoder.init_args.collapse_steps=[2,3,6]",
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(argv) == 0
    messages = collapse_warnings(record)
    assert len(messages) == 2, messages  # steps 2-3 are one episode, step 6 another
    assert "global_step 2 (epoch 0)" in messages[0] and "global_step 6 (epoch 1)" in messages[1]
    assert "learning rate" in messages[0]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "train/embedding_spread" in header and "train/embedding_rank" in header


def test_a_healthy_digits_run_does_not_warn(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(digits_argv(tmp_path, 3, 5)) == 0
    assert collapse_warnings(record) == []
    import csv

    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    spreads = [float(r["train/embedding_spread"]) for r in rows if r.get("train/embedding_spread")]
    assert len(spreads) == 15 and min(spreads) > 0.05  # measured 0.19-0.63 over 10 epochs; threshold 1e-4


@pytest.mark.parametrize("mode", ["loss", "grad"])
def test_a_non_finite_step_stops_the_run_before_the_optimizer_applies_it(tmp_path, monkeypatch, capsys, mode):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    k = 3  # epoch 1, batch 0: the first step after the checkpoint of epoch 0 (global_step 3)
    snap = tmp_path / "snapshot.pt"
    argv = digits_argv(
        tmp_path, 3, 3,
        "--model.init_args.loss=tests.experiments.test_divergence.FailingLoss",
        f"--model.init_args.loss.init_args.at_call={k}", f"--model.init_args.loss.init_args.mode={mode}",
        "--trainer.callbacks+=tests.experiments.test_divergence.Snapshot", f"--trainer.callbacks.init_args.path={snap}",
    )  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"at global_step {k} (epoch 1)" in err and "learning rate" in err and "last.ckpt" in err
    assert ("training loss is nan" in err) if mode == "loss" else ("gradients are not" in err)
    assert "Traceback" not in err
    state = torch.load(snap, weights_only=False)
    assert state["step"] == k
    for name, before in state["before"].items():
        assert torch.equal(before, state["now"][name]), f"{name} changed by the failing step"
    # last.ckpt is the one of epoch 0, untouched, and equals the weights before the failing step.
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=3.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert last["global_step"] == k
    for name, value in last["state_dict"].items():
        assert torch.equal(value, state["now"][name].to(value.device))


@pytest.mark.slow
def test_under_ddp_every_rank_stops_when_one_rank_sees_a_nan(tmp_path):
    torch.manual_seed(0)
    # The loss is NaN on rank 1 only (a rank-local term would do this): rank 0 must stop too.
    module = MetricLearningModule(TinyEncoder(), FailingLoss(at_call=1, rank=1), BatchHardMiner())
    data = DigitsDataModule(classes_per_batch=2, samples_per_class=4, num_batches=3, num_workers=0, augment=False, seed=7)
    out = str(tmp_path / "exception")
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, callbacks=[RecordingMonitor(out)],
    )  # fmt: skip
    with pytest.raises(Exception, match="global_step 1"):
        trainer.fit(module, datamodule=data)
    assert "training loss is nan at global_step 1" in Path(f"{out}.rank1").read_text()
    assert "non-finite on another rank at global_step 1" in Path(f"{out}.rank0").read_text()

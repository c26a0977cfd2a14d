"""Small real components shared by tests (module-level so DDP spawn can pickle them)."""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType

import lightning as L
import pytest
import torch
from torch import nn


class TinyEncoder(nn.Module):
    """A two-layer MLP encoder for 8x8 images (scikit-learn digits), with a ``data_config``."""

    def __init__(self, embed_dim: int = 16, image_size: int = 8) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.data_config = {"input_size": (3, image_size, image_size), "crop_pct": 1.0, "interpolation": "bilinear"}
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, 32), nn.Tanh(), nn.Linear(32, embed_dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The "backbone" (timm's split, used by feature-space mixing): ``[B, 32]``."""
        return self.net[:3](x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net[3](features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def random_batch(seed: int, n: int = 12, dim: int = 6, classes: int = 4, ref: int | None = None):
    """Float64 embeddings and labels ``(emb, labels, ref_emb, ref_labels)``; the reference set only when ``ref`` rows are asked for."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    if ref is None:
        return emb, labels, None, None
    return emb, labels, torch.randn(ref, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (ref,), generator=g)


def run_cli(argv: list[str]):
    """Run a ``hardneg fit|validate|test`` command in-process and return its ``Trainer``.

    Checks that the run really happened, not only that nothing raised: the trainer's loop finished
    and, for ``fit``, at least one optimizer step ran with a finite training loss. Tests then check
    what the run wrote (checkpoints, logs, results) themselves.
    """
    from lightning.pytorch.trainer.states import TrainerStatus

    from experiments.cli import run_status
    from experiments.lightning_cli import run_lightning_cli

    cli = run_lightning_cli(list(argv))
    trainer = cli.trainer
    assert run_status(cli) == 0, f"{argv[0]} did not finish: trainer status {trainer.state.status}"
    assert trainer.state.status == TrainerStatus.FINISHED
    if argv[0] == "fit":
        assert trainer.global_step >= 1, f"fit ran no optimizer step (global_step={trainer.global_step})"
        loss = trainer.callback_metrics.get("train/loss")
        assert loss is not None, f"fit logged no train/loss; logged: {sorted(trainer.callback_metrics)}"
        assert torch.isfinite(loss).all(), f"train/loss is {loss}"
    return trainer


def oracle(module: str) -> ModuleType:
    """Import a reference library that tests compare against (PML, sentence-transformers, ...).

    On a developer's machine a missing oracle skips the test module; under CI (``CI`` set, as
    ``.ci/run`` runs) it fails, since the ``dev`` extra declares every oracle and a skip there would
    hide a broken install behind a green run.
    """
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def require_path(path, what: str) -> None:
    """Skip (fail under CI) when a file or folder a test reads is missing, e.g. a Debian data package."""
    from pathlib import Path

    if Path(path).exists():
        return
    message = f"{what} not found at {path}"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI installs it (make install)")
    pytest.skip(message)


# ------------------------------------------------------------------------- regime module tests
def sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def sgd0(params):
    """lr 0: one step records the gradients without changing the model."""
    return torch.optim.SGD(params, lr=0.0)


def cpu_trainer(devices: int = 1, **kwargs):
    """A quiet CPU Trainer; ``devices > 1`` runs ``ddp_spawn`` on gloo (our samplers shard themselves)."""
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0, **kwargs,
    )


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with warnings silenced (Lightning's notes about small CPU runs)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class StepRecorder(L.Callback):
    """Saves every rank's first-step parameter gradients (``<out>.rank<r>``) and loss (``<out>.loss<r>``)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        torch.save(grads, f"{self.out}.rank{trainer.global_rank}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.save(outputs["loss"].detach(), f"{self.out}.loss{trainer.global_rank}")


# ------------------------------------------------------------------------- leaving a process group
def _finish_process_group() -> None:
    import datetime

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with contextlib.suppress(Exception):  # a rank whose peer failed: time out, leave, let the peer's error surface
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        else:
            dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def finish_process_groups_at_exit() -> None:
    """In a spawned test worker (Lightning's ``ddp_spawn``, ``torch.multiprocessing.spawn``): meet the other ranks at a
    barrier and destroy the process group on the way out.

    Lightning leaves a gloo group alive when a ``ddp_spawn`` worker returns (it destroys only NCCL groups at exit), and
    the worker ends with ``os._exit``. A rank that exits first closes its sockets while the slower rank's gloo threads
    still run, and gloo aborts that rank (SIGABRT, "terminate called without an active exception"): a CI failure of a
    test whose numbers were right. ``multiprocessing`` runs its finalizers in the worker before ``os._exit``; this one
    is registered from ``tests/__init__.py``, which every worker imports when it unpickles a test's objects.
    """
    import multiprocessing
    import multiprocessing.util

    global _FINISH_REGISTERED
    if multiprocessing.parent_process() is None or _FINISH_REGISTERED:
        return
    multiprocessing.util.Finalize(None, _finish_process_group, exitpriority=10)
    _FINISH_REGISTERED = True


_FINISH_REGISTERED = False


# ------------------------------------------------------------------------- raw two-process workers
@contextlib.contextmanager
def gloo_group(rank: int, world: int, init_file: str):
    """A gloo process group for a ``torch.multiprocessing.spawn`` worker, rendezvous through a file (no port to race for).

    On the way out every rank waits at a barrier before tearing the group down: a rank that destroys its group
    while the other still has a collective in flight makes gloo abort the slower process (SIGABRT, "terminate
    called without an active exception"), which failed CI once. A rank that raised skips the barrier so that the
    other's error surfaces instead of a hang.
    """
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()

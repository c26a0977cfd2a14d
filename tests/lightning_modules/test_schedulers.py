"""``WarmupDecayLR`` against transformers' warm-up schedules, stepped once per optimizer step by the
modules (plain and gradient-caching loops), its run length filled in from the trainer, and resumable."""

import functools

import lightning as L
import pytest
import torch

from lightning_modules.schedulers import WarmupDecayLR
from tests.helpers import oracle
from tests.lightning_modules.test_grad_cache_training import fit, make_module, sgd


def lrs(scheduler_factory, steps: int, lr: float = 0.5) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_equals_transformers_schedules_with_warmup(decay):
    transformers = oracle("transformers")
    theirs = {"cosine": transformers.get_cosine_schedule_with_warmup, "linear": transformers.get_linear_schedule_with_warmup,
              "constant": transformers.get_constant_schedule_with_warmup}[decay]
    kwargs = {} if decay == "constant" else {"num_training_steps": 60}
    want = lrs(lambda o: theirs(o, num_warmup_steps=7, **kwargs), 60)
    got = lrs(lambda o: WarmupDecayLR(o, warmup_steps=7, total_steps=60, decay=decay), 60)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == 0.0 and got[7] == pytest.approx(0.5)


def test_min_lr_ratio_and_no_warmup():
    got = lrs(lambda o: WarmupDecayLR(o, warmup_steps=0, total_steps=10, decay="linear", min_lr_ratio=0.2), 12, lr=1.0)
    assert got[0] == 1.0 and got[5] == pytest.approx(0.2 + 0.8 * 0.5) and got[10:] == pytest.approx([0.2, 0.2])


def test_bad_settings_are_clear_errors():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be an integer above warmup_steps=10"):
        WarmupDecayLR(opt, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="decay must be one of"):
        WarmupDecayLR(opt, decay="step")
    with pytest.raises(ValueError, match="warmup_steps must be an integer >= 0"):
        WarmupDecayLR(opt, warmup_steps=-1)
    lone = WarmupDecayLR(opt, warmup_steps=1)  # total_steps None outside a module: named when it is needed
    opt.step()
    lone.step()
    opt.step()
    with pytest.raises(ValueError, match="total_steps is None and no trainer filled it in"):
        lone.step()


class LRs(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("chunk", [None, 5], ids=["plain", "grad_cache"])
def test_modules_step_it_per_optimizer_step_over_the_trainers_run_length(tmp_path, chunk):
    # 2 epochs of 2 batches: 4 optimizer steps; total_steps comes from trainer.estimated_stepping_batches
    seen = LRs()
    schedule = functools.partial(WarmupDecayLR, warmup_steps=2, total_steps=None, decay="cosine")
    trainer = fit(make_module("triplet_batch_hard", chunk, optimizer=sgd, scheduler=schedule), tmp_path, [seen], max_steps=-1, max_epochs=2)
    config = trainer.lr_scheduler_configs[0]
    assert config.interval == "step" and config.scheduler.total_steps == 4
    want = lrs(lambda o: WarmupDecayLR(o, warmup_steps=2, total_steps=4, decay="cosine"), 4, lr=0.1)
    assert seen.lrs == pytest.approx(want) and seen.lrs[0] != seen.lrs[1]  # a new rate at every step, not every epoch


class SaveAfterFirstEpoch(L.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def test_a_resumed_run_continues_the_schedule(tmp_path):
    from torch.utils.data import DataLoader

    from tests.lightning_modules.test_grad_cache_training import Blobs

    schedule = functools.partial(WarmupDecayLR, warmup_steps=3, total_steps=None, decay="linear")
    whole = LRs()
    fit(make_module("triplet_batch_hard", None, optimizer=sgd, scheduler=schedule), tmp_path, [whole, SaveAfterFirstEpoch(tmp_path / "e0.ckpt")],
        max_steps=-1, max_epochs=2)
    resumed = LRs()
    module = make_module("triplet_batch_hard", None, optimizer=sgd, scheduler=schedule)
    trainer = L.Trainer(accelerator="cpu", precision="64-true", max_epochs=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, callbacks=[resumed])
    trainer.fit(module, train_dataloaders=DataLoader(Blobs(32), batch_size=16), ckpt_path=tmp_path / "e0.ckpt")
    assert whole.lrs == pytest.approx(lrs(lambda o: WarmupDecayLR(o, warmup_steps=3, total_steps=4, decay="linear"), 4, lr=0.1))
    assert resumed.lrs == pytest.approx(whole.lrs[2:]) and trainer.lr_scheduler_configs[0].scheduler.last_epoch == 4


def test_a_run_shorter_than_the_warmup_warns_and_stays_in_it(tmp_path):
    seen = LRs()
    schedule = functools.partial(WarmupDecayLR, warmup_steps=10, total_steps=None)
    with pytest.warns(UserWarning, match="the run has 2 optimizer steps, not more than warmup_steps=10"):
        fit(make_module("triplet_batch_hard", None, optimizer=sgd, scheduler=schedule), tmp_path, [seen], max_steps=2)
    assert seen.lrs == pytest.approx([0.0, 0.01])

"""``EmbeddingModule``: what every training regime's LightningModule shares.

A regime (``MetricLearningModule`` for labelled images, ``DualEncoderModule`` for query/document
text, ``CLIPModule`` for image-text) is its encoders plus a configuration of the shared
``EmbeddingStep``; this base holds everything else, once:

- the step and the names configs and callbacks know (``loss``, ``miner``, ``mixer``);
- ``training_step`` (embed -> step -> log), with gradient caching (``losses.GradCache``) under
  Lightning's manual optimisation keeping what automatic optimisation does (see
  ``MetricLearningModule``'s docstring), and ``after_optimizer_step`` (e.g. CLIP's logit-scale clamp)
  on both paths;
- the optimizer/scheduler factories with the loss's own parameters in their own group (``loss_lr``)
  and, with ``no_weight_decay``, biases, norm gains and scalars (``logit_scale``) in groups with
  ``weight_decay = 0`` (``lightning_modules.param_groups``: open_clip's, the transformers Trainer's
  and timm's practice);
- the evaluation bookkeeping: ``make_metrics`` at setup, ``compute``/``log``/``reset`` at epoch end.

A subclass implements the hooks: ``embed(batch)`` (the step's inputs; default: the embeddings of
``encoder_passes`` handed to ``step_inputs_from``), ``encoder_passes(batch)`` (``(encoder, inputs)``
pairs with gradient, what gradient caching chunks), ``step_inputs_from(batch, *embeddings)``,
``make_metrics()`` and ``validation_step``/``test_step``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from contracts.distances import BaseDistance
from lightning_modules.param_groups import check_no_weight_decay_rule, model_no_weight_decay, weight_decay_groups
from lightning_modules.step import EmbeddingStep
from losses.grad_cache import GradCache
from losses.shared_distance import check_distances, share_distance

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4)


def gather_mode(gather: bool | str) -> str:
    """``True`` -> "global", ``False`` -> "none"; "global", "local" and "none" as they are (``EmbeddingStep``)."""
    if isinstance(gather, bool):
        return "global" if gather else "none"
    return gather


class EmbeddingModule(L.LightningModule):
    """The shared body of the regimes' LightningModules (module docstring). Not used directly."""

    def init_core(
        self,
        loss: nn.Module,
        miner: nn.Module | None,
        mixer: nn.Module | None,
        gather: bool | str,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        distance: BaseDistance | None,
        allow_distance_mismatch: bool,
        grad_cache_chunk_size: int | None,
        no_weight_decay: str | None = None,
    ) -> None:
        """Build the step and the training machinery (call from the subclass's ``__init__``)."""
        self.no_weight_decay_rule = check_no_weight_decay_rule(no_weight_decay)
        if grad_cache_chunk_size is not None and mixer is not None and hasattr(mixer, "embed"):
            raise ValueError(
                f"grad_cache_chunk_size={grad_cache_chunk_size}: {type(mixer).__name__} re-embeds the batch inside the step "
                f"(mixer.embed), which gradient caching cannot chunk; drop the mixer or grad_cache_chunk_size"
            )
        self.grad_cache = None if grad_cache_chunk_size is None else GradCache(grad_cache_chunk_size)
        if distance is not None:
            share_distance(distance, (miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        check_distances((miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        self.step = self.make_step(loss, miner, mixer, gather_mode(gather))
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metrics: nn.Module | None = None
        self.test_metrics: nn.Module | None = None

    def make_step(self, loss: nn.Module, miner: nn.Module | None, mixer: nn.Module | None, gather: str) -> EmbeddingStep:
        """The shared step of this regime (a subclass configures memory and relevance here)."""
        return EmbeddingStep(loss, miner=miner, mixer=mixer, gather=gather)

    # the step owns its components; these are the names configs and callbacks know
    @property
    def loss(self) -> nn.Module:
        return self.step.loss

    @property
    def miner(self) -> nn.Module | None:
        return self.step.miner

    @property
    def mixer(self) -> nn.Module | None:
        return self.step.mixer

    # ---------------------------------------------------------------------------------- hooks
    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        """The encoder passes that carry gradient, as ``GradCache`` pairs ``(encoder, inputs)``."""
        raise NotImplementedError

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        """The step's inputs from the embeddings of ``encoder_passes`` (one ``[B, D]`` per pass)."""
        raise NotImplementedError

    def embed(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """The step's inputs for a training batch: every pass of ``encoder_passes`` run with graph."""
        return self.step_inputs_from(batch, *(encoder(inputs) for encoder, inputs in self.encoder_passes(batch)))

    def run_step(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The shared step on ``inputs`` (a regime with a second term, TripletCLIP, adds it here)."""
        return self.step(**inputs)

    def make_metrics(self) -> nn.Module:
        """The evaluation metric of this regime (a torchmetrics ``Metric`` or a module of them)."""
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, automatic or manual (CLIP clamps its logit scale here)."""

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.after_optimizer_step()

    # ---------------------------------------------------------------------------------- train
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        if self.grad_cache is None:
            inputs = self.embed(batch)
            outputs = self.run_step(inputs)
            batch_size = len(inputs["emb"])
        else:
            outputs, batch_size = self._grad_cache_step(batch, batch_idx)
        self.log("train/loss", outputs["loss"], prog_bar=True, batch_size=batch_size)
        if outputs["mix_loss"] is not None:
            self.log("train/mix_loss", outputs["mix_loss"], batch_size=batch_size)
        if outputs["mined"] is not None and self.miner is not None:
            self.log("train/mined_tuples", float(len(outputs["mined"])), batch_size=batch_size)
        return outputs

    # ------------------------------------------------------------------------- gradient caching
    def _grad_cache_step(self, batch: dict[str, Tensor], batch_idx: int) -> tuple[dict[str, Any], int]:
        """One manual-optimisation step with the encoder passes chunked through ``GradCache``."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        passes = self.encoder_passes(batch)
        outputs: dict[str, Any] = {}

        def objective(*embeddings: Tensor) -> Tensor:
            outputs.update(self.run_step(self.step_inputs_from(batch, *embeddings)))
            return outputs["loss"]

        wrapper = self.trainer.strategy.model
        if isinstance(wrapper, DistributedDataParallel):
            sync = wrapper.no_sync  # DDP would all-reduce on every backward: each chunk's and the loss's
        elif self.trainer.world_size > 1:
            raise ValueError(
                f"grad_cache_chunk_size: supported on one device or under DDP; the strategy "
                f"{type(self.trainer.strategy).__name__} wraps the module in {type(wrapper).__name__}"
            )
        else:
            sync = nullcontext
        with sync():
            loss = self.grad_cache(passes, objective, backward=self.manual_backward)
        if isinstance(wrapper, DistributedDataParallel):
            average_gradients(self.parameters())
            wrapper.require_forward_param_sync = True  # broadcast buffers at the next forward, as after a synced backward
        optimizer.step()
        self.after_optimizer_step()
        self._step_lr_schedulers(batch_idx)
        first = passes[0][1]
        batch_size = len(first) if isinstance(first, Tensor) else len(next(iter(first.values())))
        return {**outputs, "loss": loss}, batch_size

    def _step_lr_schedulers(self, batch_idx: int) -> None:
        """What Lightning's loop does under automatic optimisation: "step" schedulers after every
        ``frequency`` batches, "epoch" ones after the epoch's last batch (before validation)."""
        trainer = self.trainer
        last = trainer.is_last_batch or batch_idx + 1 == trainer.num_training_batches
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau:
                raise ValueError("grad_cache_chunk_size: a ReduceLROnPlateau scheduler is not supported under gradient caching")
            if config.interval == "step":
                due = (batch_idx + 1) % config.frequency == 0
            else:
                due = last and (trainer.current_epoch + 1) % config.frequency == 0
            if due:
                self.lr_scheduler_step(config.scheduler, None)

    def setup(self, stage: str) -> None:
        self.val_metrics = self.make_metrics()
        self.test_metrics = self.make_metrics()
        if stage == "fit" and self.grad_cache is not None:
            if self.trainer.accumulate_grad_batches != 1:
                raise ValueError(
                    f"grad_cache_chunk_size: Trainer(accumulate_grad_batches={self.trainer.accumulate_grad_batches}) is not "
                    f"supported; gradient caching already fits a large batch in memory: raise the batch size instead"
                )
            # after Lightning's configuration check, which rejects Trainer(gradient_clip_val) under manual optimisation
            self.automatic_optimization = False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning clips after this hook under automatic optimisation only; clip here, at the same point
        if not self.automatic_optimization:
            self.configure_gradient_clipping(
                optimizer, gradient_clip_val=self.trainer.gradient_clip_val, gradient_clip_algorithm=self.trainer.gradient_clip_algorithm
            )

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the module's trainable parameters, then the loss's own
        (proxies, a learned margin or temperature) with ``loss_lr``; each parameter once.

        ``no_weight_decay=None``: one group each, decayed as the optimizer says. A rule
        (``lightning_modules.param_groups``) splits each of the two into a decayed group and one with
        ``weight_decay = 0``, by the same rule: a loss's scalar temperature or per-class margin is
        exempt like CLIP's ``logit_scale``, while proxies (``[C, D]``, weight-like) stay decayed, as in
        Proxy-Anchor's reference training (tjddus9597/Proxy-Anchor-CVPR2020 ``code/train.py``: the
        proxies' group takes the optimizer's ``weight_decay``).
        """
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        loss_ids = {id(p) for p in loss_params}
        loss_options = {"lr": self.hparams.loss_lr} if self.hparams.get("loss_lr") else {}
        rule = self.no_weight_decay_rule
        if rule is None:
            groups: list[dict[str, Any]] = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in loss_ids]}]
            if loss_params:
                groups.append({"params": loss_params, **loss_options})
            return groups
        named = list(self.named_parameters())
        exclude = model_no_weight_decay(self) if rule == "norm_bias+model" else ()
        return (weight_decay_groups([(n, p) for n, p in named if id(p) not in loss_ids], exclude)
                + weight_decay_groups([(n, p) for n, p in named if id(p) in loss_ids], exclude, **loss_options))

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        # a scheduler declares a per-step schedule with ``interval = "step"`` (lightning_modules.schedulers.WarmupDecayLR);
        # one that needs the run's length and has none gets the trainer's count of optimizer steps
        if getattr(scheduler, "total_steps", 0) is None and self._trainer is not None:
            scheduler.total_steps = int(self.trainer.estimated_stepping_batches)
            warmup = getattr(scheduler, "warmup_steps", 0)
            if scheduler.total_steps <= warmup:  # a short (debug) run of a recipe: it ends inside the warm-up
                rank_zero_warn(f"{type(scheduler).__name__}: the run has {scheduler.total_steps} optimizer steps, not more than "
                               f"warmup_steps={warmup}: it ends inside the warm-up")
                scheduler.total_steps = warmup + 1
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": getattr(scheduler, "interval", "epoch")}}

    # ------------------------------------------------------------------------------- evaluate
    def prepare_metrics(self, metrics: nn.Module, stage: str) -> None:
        """Before an evaluation pass of ``stage`` ("validate"/"test"): what the metric needs from the
        DataModule (qrels, zero-shot class prompts)."""

    def eval_batch(self, metrics: nn.Module, batch: dict[str, Any], dataloader_idx: int = 0) -> None:
        """Embed one evaluation batch of loader ``dataloader_idx`` into ``metrics``."""
        raise NotImplementedError

    def compute_metrics(self, metrics: nn.Module) -> dict[str, float]:
        """The metric values as floats; resets the metric."""
        values = {k: float(v) for k, v in metrics.compute().items()}
        metrics.reset()
        return values

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_batch(self.val_metrics, batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.eval_batch(self.test_metrics, batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self.prepare_metrics(self.val_metrics, "validate")

    def on_test_epoch_start(self) -> None:
        self.prepare_metrics(self.test_metrics, "test")

    def _log_metrics(self, metrics: nn.Module, prefix: str) -> dict[str, float]:
        values = self.compute_metrics(metrics)
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    @torch.no_grad()
    def evaluate(self, dataloaders: Iterable | Sequence[Iterable], stage: str = "test") -> dict[str, float]:
        """The metrics of the current encoders outside the Trainer loops: ``dataloaders`` is one loader
        or the DataModule's list (``[queries, corpus]``, ``[images, captions, zero_shot]``) of ``stage``."""
        loaders = list(dataloaders) if isinstance(dataloaders, (list, tuple)) else [dataloaders]
        was_training = self.training
        self.eval()
        metrics = self.make_metrics().to(self.device)
        self.prepare_metrics(metrics, stage)
        for idx, loader in enumerate(loaders):
            for batch in loader:
                self.eval_batch(metrics, {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}, idx)
        values = self.compute_metrics(metrics)
        self.train(was_training)
        return values


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average ``.grad`` over the ranks, in place: what DDP's reducer does, as one all-reduce per dtype.
    Every rank must hold gradients for the same parameters (the same step's code on every rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.get_world_size()
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat)
        flat /= world
        for g, value in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(value.view_as(g))

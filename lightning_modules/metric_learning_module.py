"""``MetricLearningModule``: the training regime for labelled images (CUB, Cars, SOP, In-Shop ...)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any, Callable

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from contracts.distances import BaseDistance
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


class MetricLearningModule(L.LightningModule):
    """Embed -> the shared step (gather, mine, loss) -> log; retrieval metrics on val/test.

    The module holds no method-specific code: the encoder, miner and loss are injected, so any
    miner pairs with any loss by configuration. Everything after the encoder is the shared
    ``lightning_modules.step.EmbeddingStep`` (``self.step``): under DDP the embeddings of all ranks
    are gathered **with gradient** before mining, so the miner and the loss see the global batch and
    the gradients equal those of one process on the concatenated batch.

    Args:
        encoder: ``nn.Module`` mapping images ``[B, C, H, W]`` to embeddings ``[B, D]``.
        loss: ``loss(emb, labels, mined) -> scalar``; a loss with parameters (proxies) is optimised too.
        miner: ``miner(emb, labels) -> Mined``; ``None`` lets the loss use every valid tuple.
        optimizer: a callable taking parameter groups (LightningCLI: ``class_path: torch.optim.Adam``).
        scheduler: a callable taking the optimizer, stepped every epoch.
        loss_lr: learning rate of the loss's own parameters (proxy-based losses use ~100x the
            encoder's); ``None``: the optimizer's default.
        gather: how the step gathers across DDP ranks: ``True``/"global" (every rank computes the
            loss on the global batch), "local" (this rank's rows against the global batch, open_clip's
            ``local_loss``), ``False``/"none" (per-rank mining and loss).
        eval_distance: "cosine" or "euclidean" for the retrieval metrics.
        eval_ks: Recall@K list when the DataModule does not give its benchmark's ``recall_ks``.
        eval_nmi: also compute NMI (k-means) at validation and test.
        mixer: optional synthetic-example component with two hooks: ``mixer.embed(encoder, x) ->
            (emb, state)`` replaces ``encoder(x)`` (it may keep features or images in ``state``), and
            ``mixer(encoder, state, emb, labels, loss) -> scalar`` is added to the loss, on this
            rank's rows (e.g. ``losses.Metrix``: mixup in input, feature or embedding space).
        distance: the one distance of the run, handed to the miner, the loss and the mixer (and a
            memory's inner miner and loss) in place of their defaults; a component given another
            distance of its own is an error. ``None``: each keeps its own, and a disagreement that
            changes what is mined is an error naming both (rules: ``losses.shared_distance``).
        allow_distance_mismatch: keep disagreeing distances on purpose: a warning instead of the error.
        grad_cache_chunk_size: train with gradient caching (``losses.GradCache``; Gao et al., "Scaling
            Deep Contrastive Learning Batch Size under Memory Limited Setup", RepL4NLP 2021): the
            encoder runs on chunks of this many rows, so only one chunk's activations are in memory,
            and the step (gather, memory, miner, loss) runs once on the full batch's embeddings; the
            gradients equal the uncached step's. ``None``: no caching.

    Gradient caching uses Lightning's manual optimisation and keeps what automatic optimisation does:
    zero_grad/step through ``self.optimizers()``, the callbacks' ``on_before_backward`` (once, on the
    loss) and ``on_before_optimizer_step`` (before the update: a ``DivergenceMonitor`` still stops a
    non-finite step, ``HeadWarmup`` still drops the trunk's gradients), then clipping with the
    Trainer's ``gradient_clip_val``/``gradient_clip_algorithm``, the learning-rate schedulers at
    their interval, and the outputs dict for ``on_train_batch_end``. Lightning refuses
    ``Trainer(gradient_clip_val=...)`` with a module that is in manual optimisation when ``fit``
    starts (it would not clip), so the module switches to manual optimisation in ``setup("fit")``,
    after that check, and clips itself (a second ``fit`` of the same module with clipping meets the
    check in manual optimisation: build a new module). Under DDP every backward of the step runs in the DDP
    wrapper's ``no_sync()`` and the gradients are averaged over ranks once, before the optimizer step.
    Not with ``accumulate_grad_batches`` > 1, nor with a mixer that re-embeds (Metrix): its extra
    encoder pass would run on the whole batch.

    ``training_step`` returns the step's outputs dict (``loss``, ``emb``, ``labels``, ``ref_emb``,
    ``mined`` ...: see ``lightning_modules.step``), which Lightning hands to callbacks as ``outputs``
    in ``on_train_batch_end`` (``experiments.callbacks.HardnessMonitor``, ``DivergenceMonitor``).

    Mixed precision (``Trainer(precision="bf16-mixed")``): the encoder runs under autocast, the step
    casts its embeddings to float32 and computes distances and losses in float32.

    Batches are dicts. Training: ``{"image": [B, C, H, W], "label": [B]}``. Evaluation protocol:
    read from the DataModule's ``eval_protocol``. ``"self"`` (default; CUB, Cars, SOP): batches are
    ``{"image", "label", "index"}`` and every embedding is a query against the others
    (``RetrievalMetrics``). ``"query_gallery"`` (In-Shop): batches also hold ``"is_query"`` and
    queries are ranked against the gallery (``QueryGalleryRetrievalMetrics``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: nn.Module,
        miner: nn.Module | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        loss_lr: float | None = None,
        gather: bool | str = True,
        eval_distance: str = "cosine",
        eval_ks: tuple[int, ...] = (1, 2, 4, 8),
        eval_nmi: bool = False,
        mixer: nn.Module | None = None,
        distance: BaseDistance | None = None,
        allow_distance_mismatch: bool = False,
        grad_cache_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss", "miner", "optimizer", "scheduler", "mixer", "distance"])
        if grad_cache_chunk_size is not None and mixer is not None and hasattr(mixer, "embed"):
            raise ValueError(
                f"grad_cache_chunk_size={grad_cache_chunk_size}: {type(mixer).__name__} re-embeds the batch inside the step "
                f"(mixer.embed), which gradient caching cannot chunk; drop the mixer or grad_cache_chunk_size"
            )
        self.grad_cache = None if grad_cache_chunk_size is None else GradCache(grad_cache_chunk_size)
        if distance is not None:
            share_distance(distance, (miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        check_distances((miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        self.encoder = encoder
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

    # ---------------------------------------------------------------------------------- train
    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def embed(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """The step's inputs for a training batch ``{"image", "label", ...}``: this regime's one view."""
        x = batch["image"]
        emb, mix_state = self.mixer.embed(self.encoder, x) if self.mixer is not None and hasattr(self.mixer, "embed") else (self.encoder(x), None)
        return {**self.step_inputs_from(batch, emb), "encoder": self.encoder, "mix_state": mix_state}

    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        """The encoder passes of ``embed`` that carry gradient, as ``GradCache`` pairs ``(encoder, inputs)``."""
        return [(self.encoder, batch["image"])]

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        """The step's inputs from the embeddings of ``encoder_passes`` (one ``[B, D]`` per pass)."""
        (emb,) = embeddings
        return {"emb": emb, "labels": batch["label"]}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        if self.grad_cache is None:
            inputs = self.embed(batch)
            outputs = self.step(**inputs)
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
            outputs.update(self.step(**self.step_inputs_from(batch, *embeddings)))
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the shared step kept loss/miner/mixer (and MoCo's queue) at the top level.
        state = checkpoint.get("state_dict", {})
        for key in list(state):
            head = key.split(".", 1)[0]
            if head in ("loss", "miner", "mixer"):
                state[f"step.{key}"] = state.pop(key)
            elif head == "queue":
                state[f"step.memory.{key.split('.', 1)[1]}"] = state.pop(key)

    def configure_optimizers(self) -> Any:
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        loss_ids = {id(p) for p in loss_params}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.parameters() if p.requires_grad and id(p) not in loss_ids]}]
        if loss_params:
            groups.append({"params": loss_params, **({"lr": self.hparams.loss_lr} if self.hparams.loss_lr else {})})
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    # ------------------------------------------------------------------------------- evaluate
    def make_metrics(self) -> nn.Module:
        from lightning_modules.metrics import QueryGalleryRetrievalMetrics, RetrievalMetrics

        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ks = getattr(datamodule, "recall_ks", None) or self.hparams.eval_ks
        protocol = getattr(datamodule, "eval_protocol", "self")
        metric = QueryGalleryRetrievalMetrics if protocol == "query_gallery" else RetrievalMetrics
        return metric(ks=tuple(ks), nmi=self.hparams.eval_nmi, distance=self.hparams.eval_distance)

    def _eval_step(self, metrics: nn.Module, batch: dict[str, Tensor]) -> None:
        from lightning_modules.metrics import QueryGalleryRetrievalMetrics

        emb = self.encoder(batch["image"]).float()  # float32 metrics under a bf16/fp16 autocast
        if isinstance(metrics, QueryGalleryRetrievalMetrics):
            if "is_query" not in batch:
                raise ValueError(f"the query/gallery protocol needs eval batches with an is_query field; got {sorted(batch)}")
            metrics.update(emb, batch["label"], batch["is_query"].bool(), index=batch["index"])
        else:
            metrics.update(emb, batch["label"], batch["index"])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(self.val_metrics, batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(self.test_metrics, batch)

    def _log_metrics(self, metrics: nn.Module, prefix: str) -> dict[str, float]:
        values = metrics.compute()
        metrics.reset()
        self.log_dict({f"{prefix}/{k}": float(v) for k, v in values.items()}, sync_dist=True)
        return values

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    @torch.no_grad()
    def evaluate(self, dataloader: Iterable) -> dict[str, float]:
        """Retrieval metrics of the current encoder on a loader of ``{"image", "label", "index"[, "is_query"]}``
        batches (outside the Trainer loops)."""
        was_training = self.training
        self.eval()
        metrics = self.make_metrics().to(self.device)
        for batch in dataloader:
            self._eval_step(metrics, {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()})
        values = {k: float(v) for k, v in metrics.compute().items()}
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

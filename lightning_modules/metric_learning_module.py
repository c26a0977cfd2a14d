"""``MetricLearningModule``: the training regime for labelled images (CUB, Cars, SOP, In-Shop ...)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from contracts.distances import BaseDistance
from lightning_modules.embedding_module import (  # noqa: F401  (re-exported: configs and MoCoModule import them from here)
    EmbeddingModule,
    OptimizerFactory,
    SchedulerFactory,
    average_gradients,
    default_optimizer,
    gather_mode,
)


class MetricLearningModule(EmbeddingModule):
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
        no_weight_decay: the parameters weight decay leaves alone (``lightning_modules.param_groups``):
            ``None`` (default) none; ``"norm_bias"`` tensors with ``ndim < 2`` (biases, norm gains,
            scalars: open_clip's training, the transformers Trainer); ``"norm_bias+model"`` also the
            modules' ``no_weight_decay()`` names (timm). The loss's parameters follow the same rule.
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
        no_weight_decay: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss", "miner", "optimizer", "scheduler", "mixer", "distance"])
        self.encoder = encoder
        self.init_core(loss, miner, mixer, gather, optimizer, scheduler, distance, allow_distance_mismatch, grad_cache_chunk_size,
                       no_weight_decay=no_weight_decay)

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before the shared step kept loss/miner/mixer (and MoCo's queue) at the top level.
        state = checkpoint.get("state_dict", {})
        for key in list(state):
            head = key.split(".", 1)[0]
            if head in ("loss", "miner", "mixer"):
                state[f"step.{key}"] = state.pop(key)
            elif head == "queue":
                state[f"step.memory.{key.split('.', 1)[1]}"] = state.pop(key)

    # ------------------------------------------------------------------------------- evaluate
    def make_metrics(self) -> nn.Module:
        from lightning_modules.metrics import QueryGalleryRetrievalMetrics, RetrievalMetrics

        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        ks = getattr(datamodule, "recall_ks", None) or self.hparams.eval_ks
        protocol = getattr(datamodule, "eval_protocol", "self")
        metric = QueryGalleryRetrievalMetrics if protocol == "query_gallery" else RetrievalMetrics
        return metric(ks=tuple(ks), nmi=self.hparams.eval_nmi, distance=self.hparams.eval_distance)

    def eval_batch(self, metrics: nn.Module, batch: dict[str, Tensor], dataloader_idx: int = 0) -> None:
        from lightning_modules.metrics import QueryGalleryRetrievalMetrics

        emb = self.encoder(batch["image"]).float()  # float32 metrics under a bf16/fp16 autocast
        if isinstance(metrics, QueryGalleryRetrievalMetrics):
            if "is_query" not in batch:
                raise ValueError(f"the query/gallery protocol needs eval batches with an is_query field; got {sorted(batch)}")
            metrics.update(emb, batch["label"], batch["is_query"].bool(), index=batch["index"])
        else:
            metrics.update(emb, batch["label"], batch["index"])

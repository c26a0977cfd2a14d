"""``MoCoModule``: the momentum-contrast regime (two views, momentum key encoder, queue), optionally with MoCHi."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from lightning_modules.metric_learning_module import MetricLearningModule, OptimizerFactory, SchedulerFactory, default_optimizer
from lightning_modules.step import EmbeddingStep
from miners.memory import CrossBatchMemory
from models.momentum import MomentumEncoder


class MoCoModule(MetricLearningModule):
    """MoCo: a query encoder trained against keys of a momentum encoder and a queue of past keys.

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning" (CVPR 2020),
    Algorithm 1, with the MoCo v2 settings of Chen et al., "Improved Baselines with Momentum
    Contrastive Learning" (2020): for two augmented views of each image, ``q = f_q(x1)`` and
    ``k = f_k(x2)`` (``f_k``: the EMA of ``f_q``, updated before computing the keys), the loss is
    InfoNCE with the key as the positive and the queue as the negatives (Eq. 1)::

        L_q = -log( exp(q.k/t) / (exp(q.k/t) + sum_{n in queue} exp(q.n/t)) )

    computed by the injected ``loss`` (``NTXentLoss(temperature=0.2)``) on explicit pairs; the keys
    are then enqueued (``CrossBatchMemory`` as the queue, gathered across ranks under DDP). The queue
    starts empty (MoCo fills it with random vectors): the first step has no negative and loss 0.

    ``mixer`` (``miners.MoCHi``): its synthetic hard negatives ``h`` (Kalantidis et al., NeurIPS
    2020) join each query's denominator, ``+ sum_h exp(q.h/t)``, as a ``Mined.mix`` the loss
    materialises without gradient; they are never enqueued. ``supervised``: class labels are kept
    with the queue and same-label entries are not negatives (nor MoCHi candidates).

    The module is MoCo's encoders (query, momentum key) and a configuration of the shared step
    (``make_step``): no loss or queue code of its own. Batches are ``{"image", "image2", "label"}``
    (the query and key views): ``datamodules.two_view_datamodule.TwoViewDataModule``.
    Evaluation is ``MetricLearningModule``'s retrieval on the query encoder. Not done: MoCo's
    shuffling BatchNorm across GPUs (use ``freeze_bn`` or single-GPU batches).

    Args:
        encoder: the query encoder (L2-normalised output); the key encoder is its copy.
        loss: InfoNCE over explicit pairs that accepts mixes; default ``NTXentLoss(temperature=0.2)``.
        queue_size: ``K`` (MoCo v2 on ImageNet-100 with MoCHi: 16384).
        momentum: ``m`` of the key encoder (0.999).
        mixer: optional ``MoCHi`` (anything with ``mix_spec(q, queue, labels, queue_labels)`` and ``set_epoch``).
        supervised: use the batch's class labels to exclude same-label queue entries.
        optimizer, scheduler, loss_lr, no_weight_decay, eval_distance, eval_ks, eval_nmi, distance,
        allow_distance_mismatch, grad_cache_chunk_size: as ``MetricLearningModule`` (gradient caching
        chunks the query encoder; the keys need no gradient and are computed as without it).
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: nn.Module | None = None,
        queue_size: int = 16384,
        momentum: float = 0.999,
        mixer: nn.Module | None = None,
        supervised: bool = False,
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        loss_lr: float | None = None,
        eval_distance: str = "cosine",
        eval_ks: tuple[int, ...] = (1, 2, 4, 8),
        eval_nmi: bool = False,
        distance: BaseDistance | None = None,
        allow_distance_mismatch: bool = False,
        grad_cache_chunk_size: int | None = None,
        no_weight_decay: str | None = None,
    ) -> None:
        if loss is None:
            from losses import NTXentLoss

            loss = NTXentLoss(temperature=0.2)
        embed_dim = getattr(encoder, "embed_dim", None)
        if not isinstance(embed_dim, int):
            raise ValueError(f"MoCoModule: the encoder {type(encoder).__name__} has no integer embed_dim to size the queue")
        super().__init__(
            encoder=encoder, loss=loss, optimizer=optimizer, scheduler=scheduler, loss_lr=loss_lr, no_weight_decay=no_weight_decay, gather=False,
            eval_distance=eval_distance, eval_ks=eval_ks, eval_nmi=eval_nmi, mixer=mixer,
            distance=distance, allow_distance_mismatch=allow_distance_mismatch, grad_cache_chunk_size=grad_cache_chunk_size,
        )
        self.key_encoder = MomentumEncoder(encoder, momentum)

    def make_step(self, loss: nn.Module, miner: nn.Module | None, mixer: nn.Module | None, gather: str) -> EmbeddingStep:
        """MoCo as a step configuration: the queue is the step's memory (prepended to the reference
        set, enqueued with the keys of all ranks after the loss), each query's only positive is its own
        key (``pos_mask`` = identity), the other keys of the batch are not negatives
        (``in_batch_negatives=False``), and with ``supervised`` the queue entries sharing a query's label
        are ignored (``memory_same_label="ignore"``). MoCHi mixes from the memory (``mix_spec``)."""
        queue = CrossBatchMemory(nn.Identity(), embedding_size=self.encoder.embed_dim, memory_size=self.hparams.queue_size)  # storage only
        return EmbeddingStep(
            loss, miner=miner, memory=queue, mixer=mixer, gather=gather, in_batch_negatives=False, memory_same_label="ignore"
        )

    @property
    def queue(self) -> CrossBatchMemory:
        return self.step.memory

    def on_train_epoch_start(self) -> None:
        if self.mixer is not None and callable(getattr(self.mixer, "set_epoch", None)):
            self.mixer.set_epoch(self.current_epoch)

    def embed(self, batch: dict[str, Tensor]) -> dict[str, Any]:
        """Queries ``q = f_q(image)`` and keys ``k = f_k(image2)`` (the momentum encoder, updated first)."""
        ((encoder, x),) = self.encoder_passes(batch)
        return self.step_inputs_from(batch, encoder(x))

    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        """The query encoder on the first view: the only pass with gradient."""
        if "image2" not in batch:
            raise ValueError(
                f"MoCoModule: expected two views per image, batches with 'image' and 'image2'; got fields {sorted(batch)}. "
                f"Wrap the DataModule in datamodules.two_view_datamodule.TwoViewDataModule"
            )
        return [(self.encoder, batch["image"])]

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        """The keys (momentum encoder updated, then run on the second view), after the queries as in
        MoCo's Algorithm 1, and the step's inputs."""
        (q,) = embeddings
        self.key_encoder.update(self.encoder)
        k = self.key_encoder(batch["image2"]).detach()
        return self.step_inputs(q, k, batch["label"])

    def step_inputs(self, q: Tensor, k: Tensor, labels: Tensor) -> dict[str, Any]:
        """The step's inputs for queries ``q [B, D]`` and their keys ``k [B, D]`` (labels kept when ``supervised``)."""
        sup = self.hparams.supervised
        eye = torch.eye(len(q), dtype=torch.bool, device=q.device)
        return {"emb": q, "ref_emb": k, "labels": labels if sup else None, "ref_labels": labels if sup else None, "pos_mask": eye}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = super().training_step(batch, batch_idx)
        self.log("train/queue", float(len(self.queue)), batch_size=len(outputs["emb"]))
        return outputs

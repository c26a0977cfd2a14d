"""``MoCoModule``: the momentum-contrast regime (two views, momentum key encoder, queue), optionally with MoCHi."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from contracts.gather import all_gather_no_grad
from contracts.mined import Mined
from lightning_modules.metric_learning_module import MetricLearningModule, OptimizerFactory, SchedulerFactory, default_optimizer
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

    Batches are ``(views [B, 2, C, H, W], labels, ...)``: ``datamodules.two_view_datamodule.TwoViewDataModule``.
    Evaluation is ``MetricLearningModule``'s retrieval on the query encoder. Not done: MoCo's
    shuffling BatchNorm across GPUs (use ``freeze_bn`` or single-GPU batches).

    Args:
        encoder: the query encoder (L2-normalised output); the key encoder is its copy.
        loss: InfoNCE over explicit pairs that accepts mixes; default ``NTXentLoss(temperature=0.2)``.
        queue_size: ``K`` (MoCo v2 on ImageNet-100 with MoCHi: 16384).
        momentum: ``m`` of the key encoder (0.999).
        mixer: optional ``MoCHi`` (anything with ``mix_spec(q, queue, labels, queue_labels)`` and ``set_epoch``).
        supervised: use the batch's class labels to exclude same-label queue entries.
        optimizer, scheduler, loss_lr, eval_distance, eval_ks, eval_nmi, distance,
        allow_distance_mismatch: as ``MetricLearningModule``.
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
    ) -> None:
        if loss is None:
            from losses import NTXentLoss

            loss = NTXentLoss(temperature=0.2)
        super().__init__(
            encoder=encoder, loss=loss, optimizer=optimizer, scheduler=scheduler, loss_lr=loss_lr, gather=False,
            eval_distance=eval_distance, eval_ks=eval_ks, eval_nmi=eval_nmi, mixer=mixer,
            distance=distance, allow_distance_mismatch=allow_distance_mismatch,
        )
        embed_dim = getattr(encoder, "embed_dim", None)
        if not isinstance(embed_dim, int):
            raise ValueError(f"MoCoModule: the encoder {type(encoder).__name__} has no integer embed_dim to size the queue")
        self.key_encoder = MomentumEncoder(encoder, momentum)
        self.queue = CrossBatchMemory(nn.Identity(), embedding_size=embed_dim, memory_size=queue_size)  # storage only

    def on_train_epoch_start(self) -> None:
        if self.mixer is not None and callable(getattr(self.mixer, "set_epoch", None)):
            self.mixer.set_epoch(self.current_epoch)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        views, labels = batch[0], batch[1]
        if views.dim() != 5 or views.shape[1] != 2:
            raise ValueError(
                f"MoCoModule: expected two views per image, images of shape [B, 2, C, H, W]; got {tuple(views.shape)}. "
                f"Wrap the DataModule in datamodules.two_view_datamodule.TwoViewDataModule"
            )
        q = self.encoder(views[:, 0])
        self.key_encoder.update(self.encoder)
        k = self.key_encoder(views[:, 1])
        loss = self.moco_loss(q, k, labels)
        self.queue.enqueue(all_gather_no_grad(k.detach()), all_gather_no_grad(labels))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(q))
        self.log("train/queue", float(len(self.queue)), batch_size=len(q))
        return loss

    def moco_loss(self, q: Tensor, k: Tensor, labels: Tensor) -> Tensor:
        """InfoNCE of ``q: [B, D]`` with positives ``k: [B, D]`` against the current queue (plus MoCHi's points)."""
        queue, queue_labels = self.queue.filled()
        # the buffer is overwritten in place by the next enqueue: the loss keeps its own copy
        queue = queue.detach().clone().to(q.dtype)
        queue_labels = queue_labels.clone().to(labels.device)
        b, m = len(q), len(queue)
        rows = torch.arange(b, device=q.device)
        negatives = torch.ones(b, m, dtype=torch.bool, device=q.device)
        if self.hparams.supervised:
            negatives &= labels.unsqueeze(1) != queue_labels.unsqueeze(0)
        a2, n = torch.nonzero(negatives, as_tuple=True)
        mined = Mined.from_pairs(rows, m + rows, a2, n)  # reference set: [queue; keys]
        if self.mixer is not None and m > 0:
            sup = self.hparams.supervised
            spec = self.mixer.mix_spec(q, queue, labels if sup else None, queue_labels if sup else None)
            if len(spec):
                mined = dataclasses.replace(mined, mix=spec)
        ref = torch.cat([queue, k.detach()])
        ref_labels = torch.cat([queue_labels, labels])
        return self.loss(q, labels, mined, ref, ref_labels)

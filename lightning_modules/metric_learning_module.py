"""``MetricLearningModule``: the training regime for labelled images (CUB, Cars, SOP, In-Shop ...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from contracts.gather import all_gather_no_grad, all_gather_with_grad
from contracts.mined import Mined
from losses.shared_distance import check_distances, share_distance

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


def default_optimizer(params: Iterable) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-4)


class MetricLearningModule(L.LightningModule):
    """Embed -> gather across ranks -> mine -> loss -> log; retrieval metrics on val/test.

    The module holds no method-specific code: the encoder, miner and loss are injected, so any
    miner pairs with any loss by configuration. Under DDP the embeddings of all ranks are gathered
    **with gradient** before mining, so the miner and the loss see the global batch and the
    gradients equal those of one process on the concatenated batch (see ``contracts.gather``).

    Args:
        encoder: ``nn.Module`` mapping images ``[B, C, H, W]`` to embeddings ``[B, D]``.
        loss: ``loss(emb, labels, mined) -> scalar``; a loss with parameters (proxies) is optimised too.
        miner: ``miner(emb, labels) -> Mined``; ``None`` lets the loss use every valid tuple.
        optimizer: a callable taking parameter groups (LightningCLI: ``class_path: torch.optim.Adam``).
        scheduler: a callable taking the optimizer, stepped every epoch.
        loss_lr: learning rate of the loss's own parameters (proxy-based losses use ~100x the
            encoder's); ``None``: the optimizer's default.
        gather: gather embeddings across DDP ranks before mining (turn off for per-rank mining).
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

    After each training step the module keeps the batch's embeddings ``last_emb [B, D]`` (detached;
    gathered across ranks like the miner sees them), ``last_labels [B]`` and ``last_mined`` (the
    miner's ``Mined``, ``None`` without a miner) for callbacks that observe the mining
    (``experiments.callbacks.HardnessMonitor``); each step overwrites them.

    Evaluation protocol: read from the DataModule's ``eval_protocol``. ``"self"`` (default; CUB,
    Cars, SOP): batches are ``(x, y, index)`` and every embedding is a query against the others
    (``RetrievalMetrics``). ``"query_gallery"`` (In-Shop): batches are ``(x, y, index, is_query)``
    and queries are ranked against the gallery (``QueryGalleryRetrievalMetrics``).
    """

    def __init__(
        self,
        encoder: nn.Module,
        loss: nn.Module,
        miner: nn.Module | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        loss_lr: float | None = None,
        gather: bool = True,
        eval_distance: str = "cosine",
        eval_ks: tuple[int, ...] = (1, 2, 4, 8),
        eval_nmi: bool = False,
        mixer: nn.Module | None = None,
        distance: BaseDistance | None = None,
        allow_distance_mismatch: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss", "miner", "optimizer", "scheduler", "mixer", "distance"])
        if distance is not None:
            share_distance(distance, (miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        check_distances((miner, loss, mixer), allow_mismatch=allow_distance_mismatch)
        self.encoder = encoder
        self.loss = loss
        self.miner = miner
        self.mixer = mixer
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.val_metrics: nn.Module | None = None
        self.test_metrics: nn.Module | None = None
        self.last_emb: Tensor | None = None
        self.last_labels: Tensor | None = None
        self.last_mined: Mined | None = None

    # ---------------------------------------------------------------------------------- train
    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, labels = batch[0], batch[1]
        emb, mix_state = self.mixer.embed(self.encoder, x) if self.mixer is not None else (self.encoder(x), None)
        local_emb, local_labels = emb, labels
        if self.hparams.gather:
            emb, labels = all_gather_with_grad(emb), all_gather_no_grad(labels)
        mined: Mined | None = self.miner(emb, labels) if self.miner is not None else None
        # Kept (detached) for callbacks that observe the mining, e.g. experiments.callbacks.hardness_monitor;
        # without the miner's distance matrices, which only the loss below needs.
        self.last_emb, self.last_labels = emb.detach(), labels.detach()
        self.last_mined = mined.without_matrices() if mined is not None else None
        loss = self.loss(emb, labels, mined)
        if self.mixer is not None:
            mix_loss = self.mixer(self.encoder, mix_state, local_emb, local_labels, self.loss)
            self.log("train/mix_loss", mix_loss, batch_size=len(x))
            loss = loss + mix_loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        if mined is not None:
            self.log("train/mined_tuples", float(len(mined)), batch_size=len(x))
        return loss

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

    def setup(self, stage: str) -> None:
        self.val_metrics = self.make_metrics()
        self.test_metrics = self.make_metrics()

    def _eval_step(self, metrics: nn.Module, batch: Any) -> None:
        from lightning_modules.metrics import QueryGalleryRetrievalMetrics

        x, labels, index = batch[0], batch[1], batch[2]
        if isinstance(metrics, QueryGalleryRetrievalMetrics):
            if len(batch) < 4:
                raise ValueError("the query/gallery protocol needs eval batches (x, y, index, is_query); got 3 items")
            metrics.update(self.encoder(x), labels, batch[3].bool(), index=index)
        else:
            metrics.update(self.encoder(x), labels, index)

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
        """Retrieval metrics of the current encoder on a loader of ``(x, label, index[, is_query])``
        (outside the Trainer loops)."""
        was_training = self.training
        self.eval()
        metrics = self.make_metrics().to(self.device)
        for batch in dataloader:
            self._eval_step(metrics, [t.to(self.device) for t in batch])
        values = {k: float(v) for k, v in metrics.compute().items()}
        self.train(was_training)
        return values

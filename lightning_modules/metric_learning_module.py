"""``MetricLearningModule``: the training regime for labelled images (CUB, Cars, SOP, In-Shop ...)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Callable

import lightning as L
import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from lightning_modules.step import EmbeddingStep
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder", "loss", "miner", "optimizer", "scheduler", "mixer", "distance"])
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
        return {"emb": emb, "labels": batch["label"], "encoder": self.encoder, "mix_state": mix_state}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        inputs = self.embed(batch)
        outputs = self.step(**inputs)
        batch_size = len(inputs["emb"])
        self.log("train/loss", outputs["loss"], prog_bar=True, batch_size=batch_size)
        if outputs["mix_loss"] is not None:
            self.log("train/mix_loss", outputs["mix_loss"], batch_size=batch_size)
        if outputs["mined"] is not None and self.miner is not None:
            self.log("train/mined_tuples", float(len(outputs["mined"])), batch_size=batch_size)
        return outputs

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

    def setup(self, stage: str) -> None:
        self.val_metrics = self.make_metrics()
        self.test_metrics = self.make_metrics()

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

"""``DualEncoderModule``: the query -> document text retrieval regime (MS MARCO, WordNet glosses ...)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from lightning_modules.embedding_module import EmbeddingModule, OptimizerFactory, SchedulerFactory, default_optimizer
from lightning_modules.step import EmbeddingStep

TOKEN_FIELDS = ("input_ids", "attention_mask", "token_type_ids")


def tokens(batch: dict[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """The tokenizer fields of ``batch`` under ``prefix`` (``query_input_ids`` -> ``input_ids``)."""
    out = {name: batch[prefix + name] for name in TOKEN_FIELDS if prefix + name in batch}
    if "input_ids" not in out:
        raise KeyError(f"the batch has no {prefix}input_ids; its keys: {sorted(batch)}")
    return out


class DualEncoderModule(EmbeddingModule):
    """Query and document encoders trained on the shared step with in-batch and hard negatives.

    The dense-retrieval objective of Karpukhin et al., "Dense Passage Retrieval for Open-Domain
    Question Answering" (DPR, EMNLP 2020), Eq. 2: each query's positive passage against the other
    queries' passages (in-batch negatives, gathered from every rank with gradient) and its own hard
    negatives; the negative log-likelihood of the positive (InfoNCE). Any loss and miner of the zoo
    work in its place: the step hands them the masks.

    Batches follow the query/document contract (``datamodules.query_doc``): ``query_*`` / ``doc_*`` /
    ``neg_*`` tokenizer fields (``neg_*`` holds ``k`` negatives per query, query-major) and the ids
    ``query_idx [B]``, ``doc_idx [B]``, ``neg_idx [B, k]`` (``-1``: an empty slot), ``pos_idx [B, P]``
    (every known positive of the query). Relevance is by ids (``EmbeddingStep`` ``pos_ids``): a
    document that is positive for two queries of the global batch, or a known positive drawn as
    another query's hard negative, is a positive of each such query, never a negative; empty slots
    are ignored. The reference set of a query is ``[memory; every rank's positives; every rank's hard
    negatives]``.

    Args:
        query_encoder: text encoder, ``forward(tokens) -> [B, D]`` (``models.HFTextEncoder``).
        loss: a two-view loss (``losses.CLIPLoss(symmetric=False)``: InfoNCE, sentence-transformers'
            ``MultipleNegativesRankingLoss``; ``symmetric=True`` adds document -> query over the
            positives), which gets ``logit_scale = 1 / temperature``; or any loss of the zoo
            (``NTXentLoss``, ``TripletMarginLoss`` ...), which uses its own settings and the miner.
        doc_encoder: the document tower; ``None``: shared with the queries (siamese, as
            sentence-transformers; DPR uses two).
        miner: ``miner(emb, labels, ref_emb, ref_labels, pos_mask=, ignore_mask=)``; not with a two-view loss.
        memory_size: > 0: a queue (``miners.CrossBatchMemory``) of this many past documents of every
            rank, with their ids (so a queued positive stays a positive), as extra negatives.
        temperature: the softmax temperature of a two-view loss (0.05: sentence-transformers' scale 20).
        learn_temperature: learn it (as CLIP's ``logit_scale``, clamped to ``max_logit_scale``).
        gather, distance, allow_distance_mismatch, grad_cache_chunk_size, optimizer, scheduler,
            loss_lr: as ``MetricLearningModule``. ``gather="local"`` is exact for a two-view loss
            (a mean over rows); "global" for any loss.
        eval_ks: Recall@K cut-offs of validation and test (``RankingMetrics``; MRR@10 and nDCG@10 always).
        eval_distance: "cosine" or "dot" for the evaluation search.

    Validation and test: the DataModule's ``eval_protocol = "query_doc"`` loaders ``[queries, corpus]``;
    the queries are embedded by the query tower, the corpus by the document tower, and
    ``RankingMetrics`` ranks the whole corpus (sharded across ranks) against ``datamodule.qrels(stage)``.
    """

    def __init__(
        self,
        query_encoder: nn.Module,
        loss: nn.Module,
        doc_encoder: nn.Module | None = None,
        miner: nn.Module | None = None,
        memory_size: int = 0,
        mixer: nn.Module | None = None,
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        loss_lr: float | None = None,
        temperature: float = 0.05,
        learn_temperature: bool = False,
        max_logit_scale: float = math.log(100),
        gather: bool | str = True,
        distance: BaseDistance | None = None,
        allow_distance_mismatch: bool = False,
        grad_cache_chunk_size: int | None = None,
        eval_ks: tuple[int, ...] = (10, 100, 1000),
        eval_distance: str = "cosine",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["query_encoder", "doc_encoder", "loss", "miner", "mixer", "optimizer", "scheduler", "distance"])
        two_view = bool(getattr(loss, "two_view", False))
        if temperature <= 0:
            raise ValueError(f"DualEncoderModule: temperature must be > 0, got {temperature}")
        if learn_temperature and not two_view:
            raise ValueError(
                f"DualEncoderModule: learn_temperature=True needs a two-view loss (losses.CLIPLoss), which takes the module's "
                f"logit scale; {type(loss).__name__} keeps its own temperature"
            )
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self._memory = None
        if memory_size > 0:
            from miners.memory import CrossBatchMemory

            dim = getattr(query_encoder, "embed_dim", None)
            if not isinstance(dim, int):
                raise ValueError(f"DualEncoderModule: memory_size needs the encoder's embed_dim; {type(query_encoder).__name__} has none")
            self._memory = CrossBatchMemory(nn.Identity(), embedding_size=dim, memory_size=memory_size)  # storage only
        self.init_core(loss, miner, mixer, gather, optimizer, scheduler, distance, allow_distance_mismatch, grad_cache_chunk_size)

    def make_step(self, loss: nn.Module, miner: nn.Module | None, mixer: nn.Module | None, gather: str) -> EmbeddingStep:
        return EmbeddingStep(loss, miner=miner, memory=self._memory, mixer=mixer, gather=gather)

    @property
    def encoder(self) -> nn.Module:
        """The query tower: its ``data_config`` (tokenizer, max_length, prefixes) is what the DataModule
        tokenizes with (both towers share one tokenizer) and its ``embed_dim`` what pre-flight checks."""
        return self.query_encoder

    @property
    def documents(self) -> nn.Module:
        """The document tower (the query tower when shared)."""
        return self.doc_encoder if self.doc_encoder is not None else self.query_encoder

    # ---------------------------------------------------------------------------------- train
    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        passes = [(self.query_encoder, tokens(batch, "query_")), (self.documents, tokens(batch, "doc_"))]
        if "neg_input_ids" in batch:
            passes.append((self.documents, tokens(batch, "neg_")))
        return passes

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        q, d, *rest = embeddings
        inputs: dict[str, Any] = {"emb": q, "ref_emb": d, "pos_ids": batch["pos_idx"], "ref_ids": batch["doc_idx"]}
        if rest:
            inputs["neg_emb"], inputs["neg_ids"] = rest[0], batch["neg_idx"].reshape(-1)
        if self.step.two_view:
            inputs["loss_kwargs"] = {"logit_scale": self.logit_scale.exp()}
        return inputs

    def after_optimizer_step(self) -> None:
        if isinstance(self.logit_scale, nn.Parameter):
            with torch.no_grad():
                self.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = super().training_step(batch, batch_idx)
        if isinstance(self.logit_scale, nn.Parameter):
            self.log("train/temperature", 1.0 / self.logit_scale.detach().exp(), batch_size=len(batch["query_idx"]))
        return outputs

    # ------------------------------------------------------------------------------- evaluate
    def make_metrics(self) -> nn.Module:
        from lightning_modules.metrics import RankingMetrics

        return RankingMetrics(ks=tuple(self.hparams.eval_ks), distance=self.hparams.eval_distance)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "eval_protocol", None) != "query_doc":
            raise ValueError(
                f"DualEncoderModule evaluates query -> document retrieval; {type(datamodule).__name__} has eval_protocol="
                f"{getattr(datamodule, 'eval_protocol', None)!r}, expected 'query_doc' (a datamodules.QueryDocDataModule)"
            )

    def prepare_metrics(self, metrics: nn.Module, stage: str) -> None:
        metrics.set_qrels(self.trainer.datamodule.qrels(stage))

    def eval_batch(self, metrics: nn.Module, batch: dict[str, Tensor], dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            metrics.update_queries(self.query_encoder(tokens(batch)).float(), batch["index"])
        else:
            metrics.update_docs(self.documents(tokens(batch)).float(), batch["index"])

"""``DualEncoderModule``: the query -> document text retrieval regime (MS MARCO, WordNet glosses ...)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance
from contracts.gather import all_gather_no_grad, all_gather_with_grad, dist_ready
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
            positives; ``losses.SigLIPLoss``: the pairwise sigmoid, with ``logit_bias``), which gets
            ``logit_scale = 1 / temperature`` (and ``logit_bias``); or any loss of the zoo
            (``NTXentLoss``, ``TripletMarginLoss`` ...), which uses its own settings and the miner.
        doc_encoder: the document tower; ``None``: shared with the queries (siamese, as
            sentence-transformers; DPR uses two).
        miner: ``miner(emb, labels, ref_emb, ref_labels, pos_mask=, ignore_mask=)``; not with a two-view loss.
        memory_size: > 0: a queue (``miners.CrossBatchMemory``) of this many past documents of every
            rank, with their ids (so a queued positive stays a positive), as extra negatives.
        temperature: the softmax temperature of a two-view loss (0.05: sentence-transformers' scale 20).
        learn_temperature: learn it (as CLIP's ``logit_scale``, clamped to ``max_logit_scale``), and the
            logit bias when there is one (not clamped, as open_clip).
        logit_bias: the initial value of the bias ``b`` a two-view loss adds to every logit (SigLIP's
            Eq. 1); learned with ``learn_temperature``, else fixed (a buffer). ``None``: no bias (the
            loss gets none). Required by a loss with ``needs_logit_bias`` (``SigLIPLoss``); refused by a
            loss whose ``directional`` takes no ``logit_bias``. (``CLIPLoss`` takes one, but a softmax
            is shift-invariant: the bias changes neither its value nor its gradients.)
        gather, distance, allow_distance_mismatch, grad_cache_chunk_size, optimizer, scheduler,
            loss_lr, no_weight_decay: as ``MetricLearningModule`` (a learned temperature, a scalar, is
            exempt under a ``no_weight_decay`` rule). ``gather="local"`` is exact for a two-view loss
            (a mean over rows); "global" for any loss.
        eval_ks: Recall@K cut-offs of validation and test (``RankingMetrics``; MRR@10 and nDCG@10 always).
        eval_distance: "cosine" or "dot" for the evaluation search.
        guide: a ``miners.GuidedFilter`` (GISTEmbed, Solatorio 2024): the guide model's false
            negatives among ``[every rank's positives; every rank's hard negatives]`` are ignored
            pairs of the step (any loss, any gather mode); the fraction of candidate pairs it masks is
            logged as ``train/guide_masked``. Memory entries are not guided (no texts).
        teacher: a ``models.scorers`` scorer of each query's ``[positive, hard negatives]``
            (``CrossEncoderScorer``, ``BiEncoderScorer``, ``FileScorer``); needs ``distillation_loss``.
        distillation_loss: a ``losses.distillation`` loss (``KLDistillationLoss``, ``MarginMSELoss``)
            between the student's scores of those candidates (from the step's embeddings, every
            rank's rows gathered unless ``gather="none"``, by the loss's ``similarity``) and the teacher's; ``distillation_weight`` times it
            is added to the step's loss and logged as ``train/distill_loss``. Empty slots (id -1)
            and pairs without a teacher score (NaN) are left out. Needs hard negatives
            (``num_negatives > 0``).

    SigLIP (Zhai et al., "Sigmoid Loss for Language Image Pre-Training", ICCV 2023, Eq. 1) in this
    regime: ``DualEncoderModule(enc, losses.SigLIPLoss(), temperature=0.1, logit_bias=-10.0,
    learn_temperature=True)`` is the paper's initialisation (``t' = log 10``, ``b = -10``). The loss
    sums one binary term per scored pair, so it takes the step's reference set as it is: every
    rank's hard negatives (and the memory's entries) are extra ``z = -1`` pairs of every query; a
    document relevant to two queries of the global batch, or a known positive drawn as another
    query's hard negative, is a ``z = +1`` pair of each (by ids); empty slots and the guide's false
    negatives are dropped from the sum; the sum is divided by the number of queries. That is a mean
    of per-query terms, so ``gather="local"`` is exact for it too. The bias is logged as
    ``train/logit_bias`` when learned.

    Raw texts: a guide, and a teacher with ``inputs == "text"``, read the batch's raw strings
    (``query_text``, ``doc_text``, ``neg_text``), which ``datamodules.inputs.TextInputs`` adds with
    ``keep_text``. The module says so with ``needs_text``; at ``setup("fit")`` it turns ``keep_text``
    on in the DataModule's train collate (a ``TokenizeCollate``), so a config needs nothing more
    (``data.init_args.data_config: {keep_text: true}`` does the same by hand). A batch without the
    texts raises an error naming that setting.

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
        logit_bias: float | None = None,
        gather: bool | str = True,
        distance: BaseDistance | None = None,
        allow_distance_mismatch: bool = False,
        grad_cache_chunk_size: int | None = None,
        eval_ks: tuple[int, ...] = (10, 100, 1000),
        eval_distance: str = "cosine",
        guide: nn.Module | None = None,
        teacher: nn.Module | None = None,
        distillation_loss: nn.Module | None = None,
        distillation_weight: float = 1.0,
        no_weight_decay: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["query_encoder", "doc_encoder", "loss", "miner", "mixer", "optimizer", "scheduler", "distance", "guide", "teacher", "distillation_loss"]
        )
        if (teacher is None) != (distillation_loss is None):
            raise ValueError(
                "DualEncoderModule: teacher and distillation_loss go together (a teacher's scores and the loss that distils them); "
                f"got teacher={type(teacher).__name__ if teacher is not None else None}, "
                f"distillation_loss={type(distillation_loss).__name__ if distillation_loss is not None else None}"
            )
        if teacher is not None and not hasattr(teacher, "score"):
            raise TypeError(f"DualEncoderModule: teacher {type(teacher).__name__} has no score(queries, candidates); expected a models.scorers scorer")
        if guide is not None and not hasattr(guide, "encode"):
            raise TypeError(f"DualEncoderModule: guide {type(guide).__name__} has no encode(texts); expected a miners.GuidedFilter")
        self.guide, self.teacher, self.distillation_loss = guide, teacher, distillation_loss
        self.distillation_weight = float(distillation_weight)
        self._extras: dict[str, Any] = {}
        two_view = bool(getattr(loss, "two_view", False))
        if temperature <= 0:
            raise ValueError(f"DualEncoderModule: temperature must be > 0, got {temperature}")
        if learn_temperature and not two_view:
            raise ValueError(
                f"DualEncoderModule: learn_temperature=True needs a two-view loss (losses.CLIPLoss), which takes the module's "
                f"logit scale; {type(loss).__name__} keeps its own temperature"
            )
        check_logit_bias(loss, logit_bias)
        self.query_encoder = query_encoder
        self.doc_encoder = doc_encoder
        scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        if logit_bias is None:
            self.logit_bias: Tensor | None = None
        elif learn_temperature:
            self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        else:
            self.register_buffer("logit_bias", torch.tensor(float(logit_bias)))
        self._memory = None
        if memory_size > 0:
            from miners.memory import CrossBatchMemory

            dim = getattr(query_encoder, "embed_dim", None)
            if not isinstance(dim, int):
                raise ValueError(f"DualEncoderModule: memory_size needs the encoder's embed_dim; {type(query_encoder).__name__} has none")
            self._memory = CrossBatchMemory(nn.Identity(), embedding_size=dim, memory_size=memory_size)  # storage only
        self.init_core(loss, miner, mixer, gather, optimizer, scheduler, distance, allow_distance_mismatch, grad_cache_chunk_size,
                       no_weight_decay=no_weight_decay)

    def make_step(self, loss: nn.Module, miner: nn.Module | None, mixer: nn.Module | None, gather: str) -> EmbeddingStep:
        return EmbeddingStep(loss, miner=miner, memory=self._memory, mixer=mixer, gather=gather)

    @property
    def needs_text(self) -> bool:
        """The guide or the teacher reads the batch's raw texts (``TextInputs(keep_text=True)``)."""
        teacher_text = self.teacher is not None and getattr(self.teacher, "inputs", "text") == "text"
        return self.guide is not None or teacher_text

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
            if self.logit_bias is not None:
                inputs["loss_kwargs"]["logit_bias"] = self.logit_bias
        return inputs

    def after_optimizer_step(self) -> None:
        if isinstance(self.logit_scale, nn.Parameter):
            with torch.no_grad():
                self.logit_scale.clamp_(0, self.hparams.max_logit_scale)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        # the guide's and the teacher's views of the batch: computed once, before the encoders (and
        # outside gradient caching, whose objective may run the step more than once)
        self._extras = self.batch_extras(batch)
        try:
            outputs = super().training_step(batch, batch_idx)
        finally:
            self._extras = {}
        n = len(batch["query_idx"])
        if isinstance(self.logit_scale, nn.Parameter):
            self.log("train/temperature", 1.0 / self.logit_scale.detach().exp(), batch_size=n)
        if isinstance(self.logit_bias, nn.Parameter):
            self.log("train/logit_bias", self.logit_bias.detach(), batch_size=n)
        if outputs.get("guide_masked") is not None:
            self.log("train/guide_masked", outputs["guide_masked"], batch_size=n)
        if outputs.get("distill_loss") is not None:
            self.log("train/distill_loss", outputs["distill_loss"], batch_size=n)
        return outputs

    # ------------------------------------------------------------------- guide and teacher
    def batch_texts(self, batch: dict[str, Any], key: str) -> list[str]:
        if key not in batch:
            raise KeyError(
                f"DualEncoderModule: the batch has no {key!r} (raw texts), which the guide/teacher reads; the DataModule's "
                f"TextInputs must keep them: TextInputs(keep_text=True) or data.init_args.data_config: {{keep_text: true}}"
            )
        return list(batch[key])

    def batch_extras(self, batch: dict[str, Any]) -> dict[str, Any]:
        """What the guide and the teacher make of this batch, without gradient: the guide's embeddings
        (gathered across ranks as the step gathers the student's) and the teacher's scores ``[B, 1 + k]``."""
        extras: dict[str, Any] = {}
        device = batch["query_idx"].device
        has_negs = "neg_input_ids" in batch and batch["neg_idx"].numel() > 0
        if self.guide is not None:
            q = self.guide.encode(self.batch_texts(batch, "query_text")).to(device)
            cands = [self.guide.encode(self.batch_texts(batch, "doc_text")).to(device)]
            if has_negs:
                cands.append(self.guide.encode(self.batch_texts(batch, "neg_text")).to(device))
            if self.step.gather != "none" and dist_ready():
                q, cands = all_gather_no_grad(q), [all_gather_no_grad(c) for c in cands]
            extras["guide"] = (q, torch.cat(cands))
        if self.teacher is not None:
            if not has_negs:
                raise ValueError(
                    "DualEncoderModule: distillation scores each query's [positive, hard negatives]; the batch has no hard "
                    "negatives: set the DataModule's num_negatives > 0"
                )
            k = batch["neg_idx"].shape[1]
            ids = torch.cat([batch["doc_idx"].view(-1, 1), batch["neg_idx"]], 1)
            if getattr(self.teacher, "inputs", "text") == "ids":
                scores = self.teacher.score(batch["query_idx"].cpu(), ids.cpu())
            else:
                docs, negs = self.batch_texts(batch, "doc_text"), self.batch_texts(batch, "neg_text")
                scores = self.teacher.score(self.batch_texts(batch, "query_text"), [[d, *negs[i * k:(i + 1) * k]] for i, d in enumerate(docs)])
            if tuple(scores.shape) != tuple(ids.shape):
                raise ValueError(f"DualEncoderModule: the teacher's scores have shape {tuple(scores.shape)}; expected {tuple(ids.shape)} ([B, 1 + k])")
            extras["teacher"] = (scores.to(device).float(), ids >= 0)
        return extras

    def guide_ignore(self, q_rows: slice | None, pos: Tensor, ign: Tensor) -> Tensor:
        """The step's ``extra_ignore`` hook: the guide's false negatives among the scored queries'
        candidates ``[positives; negatives]`` (``[Q, R + N]``); the fraction of candidate pairs
        masked is kept for logging."""
        q, cands = self._extras["guide"]
        rows = torch.arange(len(q), device=q.device)  # gathered queries and their paired positives share a row
        if q_rows is not None:
            q, rows = q[q_rows], rows[q_rows]
        if tuple(pos.shape) != (len(q), len(cands)):
            raise RuntimeError(
                f"DualEncoderModule guide: the step scores {tuple(pos.shape)} pairs but the guide has {len(q)} queries x {len(cands)} "
                f"candidates; the guide's texts and the encoders' inputs disagree"
            )
        mask = self.guide(q, cands, rows, positives=pos) & ~ign
        candidates = (~pos & ~ign).sum().clamp(min=1)
        self._guide_fraction = mask.sum().float() / candidates
        return mask

    def run_step(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The shared step, with the guide's ignored pairs (``extra_ignore``) and the distillation term."""
        guided = "guide" in self._extras
        out = self.step(**inputs, extra_ignore=self.guide_ignore if guided else None)
        out["guide_masked"] = self._guide_fraction if guided else None
        out["distill_loss"] = None
        if "teacher" in self._extras:
            teacher, valid = self._extras["teacher"]
            with torch.autocast(device_type=inputs["emb"].device.type, enabled=False):
                from losses.distillation import candidate_scores

                student = candidate_scores(
                    inputs["emb"].float(), inputs["ref_emb"].float(), inputs["neg_emb"].float(), similarity=self.distillation_loss.similarity
                )
                if self.step.gather != "none" and dist_ready():
                    # the global batch's term on every rank (its mean runs over a data-dependent count of valid
                    # candidates, so a mean of per-rank means is not it); the gather's backward sums the W identical
                    # copies and DDP's average divides them away
                    student = all_gather_with_grad(student)
                    teacher, valid = all_gather_no_grad(teacher), all_gather_no_grad(valid)
                distill = self.distillation_loss(student, teacher, valid)
            out["loss"] = out["loss"] + self.distillation_weight * distill
            out["distill_loss"] = distill.detach()
        return out

    # ------------------------------------------------------------------------------- evaluate
    def make_metrics(self) -> nn.Module:
        from lightning_modules.metrics import RankingMetrics

        return RankingMetrics(ks=tuple(self.hparams.eval_ks), distance=self.hparams.eval_distance)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and datamodule is not None:
            self.prepare_components(datamodule)
        if datamodule is not None and getattr(datamodule, "eval_protocol", None) != "query_doc":
            raise ValueError(
                f"DualEncoderModule evaluates query -> document retrieval; {type(datamodule).__name__} has eval_protocol="
                f"{getattr(datamodule, 'eval_protocol', None)!r}, expected 'query_doc' (a datamodules.QueryDocDataModule)"
            )

    def prepare_components(self, datamodule: Any) -> None:
        """Ask the DataModule (set up before the module) for raw texts when the guide/teacher needs
        them, and hand an id-based teacher the train split's query ids and the corpus's document ids."""
        from datamodules.inputs import TokenizeCollate

        collate = getattr(datamodule, "collate_fn", None)
        if self.needs_text and isinstance(collate, TokenizeCollate):
            collate.keep_text = True
        if self.teacher is not None and hasattr(self.teacher, "bind_ids") and getattr(datamodule, "data", None) is not None:
            data = datamodule.data
            self.teacher.bind_ids(getattr(data.train, "query_ids", None), getattr(data, "doc_ids", None))

    def prepare_metrics(self, metrics: nn.Module, stage: str) -> None:
        metrics.set_qrels(self.trainer.datamodule.qrels(stage))

    def eval_batch(self, metrics: nn.Module, batch: dict[str, Tensor], dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            metrics.update_queries(self.query_encoder(tokens(batch)).float(), batch["index"])
        else:
            metrics.update_docs(self.documents(tokens(batch)).float(), batch["index"])


def check_logit_bias(loss: nn.Module, logit_bias: float | None) -> None:
    """Refuse a bias the loss would never see, and a loss that needs one without it.

    A two-view loss takes the bias through ``directional(..., logit_bias=...)`` (what the step calls);
    other losses get no ``loss_kwargs`` from this module at all."""
    name = type(loss).__name__
    if logit_bias is None:
        if getattr(loss, "needs_logit_bias", False):
            raise ValueError(
                f"DualEncoderModule: {name} needs a logit bias (the learnable b of SigLIP's Eq. 1); pass logit_bias=-10.0 "
                f"(the paper's initial value, with temperature=0.1 and learn_temperature=True), or 0.0 to start from none"
            )
        return
    if not getattr(loss, "two_view", False):
        raise ValueError(
            f"DualEncoderModule: logit_bias={logit_bias} goes to a two-view loss (losses.SigLIPLoss, losses.CLIPLoss); "
            f"{name} scores pairs with its own settings and takes no bias: drop logit_bias"
        )
    directional = getattr(loss, "directional", None)
    params = inspect.signature(directional).parameters if callable(directional) else {}
    takes = "logit_bias" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes:
        raise ValueError(f"DualEncoderModule: logit_bias={logit_bias}, but {name}.directional takes no logit_bias argument: drop logit_bias")

"""``CLIPModule``: the image <-> text regime (CLIP, SigLIP, NegCLIP, TripletCLIP) on the shared step."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.embedding_module import EmbeddingModule, OptimizerFactory, SchedulerFactory, default_optimizer
from lightning_modules.step import EmbeddingStep

HARD_NEGATIVES = ("none", "text", "text_and_image")


class CLIPModule(EmbeddingModule):
    """An image tower and a text tower trained with a two-view loss on the shared step.

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP,
    ICML 2021), Figure 3: the image and text embeddings of a batch of pairs, every other pair's
    member a negative, ``logit_scale`` learned. The step gathers both views from every rank with
    gradient; in ``gather="local"`` mode (the default, open_clip's ``local_loss``) each rank scores
    its own rows against the global batch, ``O(B_local x B_global)`` memory, and the loss and gradients
    equal those of one process on the global batch.

    Hard negatives (``hard_negatives``), read from the batch's ``neg_text`` / ``neg_image``:

    - ``"text"``: NegCLIP (Yuksekgonul et al., "When and Why Vision-Language Models Behave like
      Bags-of-Words, and What to Do About It?", ICLR 2023, Sec. 5): every rank's hard negative
      captions are extra columns of the image -> text softmax (gathered like the captions, with
      gradient); text -> image stays over the true pairs.
    - ``"text_and_image"``: TripletCLIP (Patel et al., "TripletCLIP: Improving Compositional
      Reasoning of CLIP via Synthetic Vision-Language Negatives", NeurIPS 2024): the NegCLIP term
      above plus the same term on the negative pairs, NegCLIP(X', Y', Y), summed.

    Items without a negative (``has_neg`` False) contribute no negative column (the column is left
    out of every row, not ignored per row, so the remaining negatives are shared as NegCLIP's).

    Args:
        model: an image-text encoder with ``encode_image``, ``encode_text``, ``logit_scale`` (log
            scale, a parameter), optional ``logit_bias``, ``image_encoder``/``text_encoder`` views (for
            gradient caching), ``clamp_logit_scale_()`` and ``data_config`` (``models.OpenCLIPEncoder``).
        loss: a two-view loss: ``losses.CLIPLoss()`` or ``losses.SigLIPLoss()`` (give the model
            ``init_logit_scale=log(10), init_logit_bias=-10`` for SigLIP).
        hard_negatives: "none", "text" (NegCLIP) or "text_and_image" (TripletCLIP).
        gather: "local" (default), "global" or "none" (per-rank loss).
        grad_cache_chunk_size: gradient caching of both towers (``losses.GradCache``).
        eval_ks: Recall@K of image <-> text retrieval; zero-shot accuracy at 1 and 5 when the
            DataModule gives class names.
        no_weight_decay: ``None`` (default: every parameter decayed, one group) or a rule of
            ``lightning_modules.param_groups``: ``"norm_bias"`` exempts biases, norm gains and the
            ``logit_scale``/``logit_bias`` scalars, the partition of open_clip's training
            (``open_clip_train/main.py``); ``"norm_bias+model"`` also the position embeddings and
            class token the open_clip model lists in ``no_weight_decay()`` (timm's optimizer factory).

    After every optimiser step the logit scale is clamped to ``[0, ln 100]``, as open_clip's
    training does. Mixed precision: ``Trainer(precision="bf16-mixed")`` runs the towers under
    autocast; the step computes logits and the loss in float32.

    Validation and test read the DataModule's ``eval_protocol = "image_text"`` loaders ``[images,
    captions(, zero_shot)]``: image -> text and text -> image Recall@K with several captions per
    image (``ImageTextRetrievalMetrics``) and zero-shot accuracy from class-name prompts
    (``ZeroShotAccuracy``), each synced across ranks.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module,
        hard_negatives: str = "none",
        optimizer: OptimizerFactory = default_optimizer,
        scheduler: SchedulerFactory | None = None,
        gather: bool | str = "local",
        grad_cache_chunk_size: int | None = None,
        eval_ks: tuple[int, ...] = (1, 5, 10),
        no_weight_decay: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "loss", "optimizer", "scheduler"])
        if not getattr(loss, "two_view", False):
            raise ValueError(f"CLIPModule needs a two-view loss (losses.CLIPLoss, losses.SigLIPLoss); got {type(loss).__name__}")
        if hard_negatives not in HARD_NEGATIVES:
            raise ValueError(f"CLIPModule: hard_negatives={hard_negatives!r}; expected one of {HARD_NEGATIVES}")
        for name in ("encode_image", "encode_text", "logit_scale"):
            if not hasattr(model, name):
                raise TypeError(f"CLIPModule: the model ({type(model).__name__}) has no {name}; use models.OpenCLIPEncoder or give it one")
        if getattr(loss, "needs_logit_bias", False) and getattr(model, "logit_bias", None) is None:
            raise ValueError(
                f"CLIPModule: {type(loss).__name__} needs the model's logit bias (SigLIP's Eq. 1), but {type(model).__name__} has none; "
                f"build it with one (models.OpenCLIPEncoder(..., init_logit_scale=math.log(10), init_logit_bias=-10))"
            )
        self.model = model
        self.init_core(loss, None, None, gather, optimizer, scheduler, None, False, grad_cache_chunk_size, no_weight_decay=no_weight_decay)

    def make_step(self, loss: nn.Module, miner: nn.Module | None, mixer: nn.Module | None, gather: str) -> EmbeddingStep:
        return EmbeddingStep(loss, gather=gather)

    @property
    def encoder(self) -> nn.Module:
        """The image-text model: its ``data_config`` (image transforms, tokenizer) drives the DataModule."""
        return self.model

    # ---------------------------------------------------------------------------------- train
    def encoder_passes(self, batch: dict[str, Tensor]) -> list[tuple[nn.Module, Any]]:
        image_enc, text_enc = self._towers()
        passes = [(image_enc, batch["image"]), (text_enc, batch["text"])]
        if self.hparams.hard_negatives != "none":
            if "neg_text" not in batch:
                raise KeyError(f"CLIPModule(hard_negatives={self.hparams.hard_negatives!r}) needs neg_text in the batch; its keys: {sorted(batch)}")
            passes.append((text_enc, batch["neg_text"]))
        if self.hparams.hard_negatives == "text_and_image":
            if "neg_image" not in batch:
                raise KeyError(f"CLIPModule(hard_negatives='text_and_image') needs neg_image in the batch; its keys: {sorted(batch)}")
            passes.append((image_enc, batch["neg_image"]))
        return passes

    def _towers(self) -> tuple[nn.Module, nn.Module]:
        image_enc = getattr(self.model, "image_encoder", None)
        text_enc = getattr(self.model, "text_encoder", None)
        if image_enc is None or text_enc is None:
            image_enc, text_enc = _Call(self.model, "encode_image"), _Call(self.model, "encode_text")
        return image_enc, text_enc

    def step_inputs_from(self, batch: dict[str, Tensor], *embeddings: Tensor) -> dict[str, Any]:
        img, txt, *negs = embeddings
        kwargs = {"logit_scale": self.model.logit_scale.exp()}
        if getattr(self.model, "logit_bias", None) is not None:
            kwargs["logit_bias"] = self.model.logit_bias
        eye = torch.eye(len(img), dtype=torch.bool, device=img.device)
        inputs: dict[str, Any] = {"emb": img, "ref_emb": txt, "pos_mask": eye, "loss_kwargs": kwargs}
        if negs:
            has = batch.get("has_neg")
            keep = slice(None) if has is None else has.bool()
            inputs["neg_emb"] = negs[0][keep]
            if len(negs) == 2:  # TripletCLIP's second term: the negative images with their captions, the true captions as negatives
                inputs["second"] = {"emb": negs[1][keep], "ref_emb": negs[0][keep], "neg_emb": txt[keep]}
        return inputs

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Any]:
        outputs = super().training_step(batch, batch_idx)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp(), batch_size=len(batch["image"]))
        return outputs

    def run_step(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The shared step on the pairs, plus TripletCLIP's second term when present."""
        second = inputs.pop("second", None)
        out = self.step(**inputs)
        if second is not None:
            n = len(second["emb"])
            eye = torch.eye(n, dtype=torch.bool, device=second["emb"].device)
            more = self.step(**second, pos_mask=eye, loss_kwargs=inputs["loss_kwargs"])
            out = {**out, "loss": out["loss"] + more["loss"]}
        return out

    def after_optimizer_step(self) -> None:
        clamp = getattr(self.model, "clamp_logit_scale_", None)
        if callable(clamp):
            clamp()

    # ------------------------------------------------------------------------------- evaluate
    def make_metrics(self) -> nn.Module:
        from lightning_modules.metrics import ImageTextRetrievalMetrics, ZeroShotAccuracy

        return nn.ModuleDict({"retrieval": ImageTextRetrievalMetrics(ks=tuple(self.hparams.eval_ks)), "zero_shot": ZeroShotAccuracy()})

    def _classifier(self) -> Tensor | None:
        """Class embeddings ``[C, P, D]`` from the DataModule's class names and prompt templates."""
        datamodule = getattr(self.trainer, "datamodule", None)
        classes = getattr(datamodule, "zero_shot_classes", None)
        if not classes:
            return None
        templates = getattr(datamodule, "zero_shot_templates", None) or ["a photo of a {}."]
        tokenizer = self.model.data_config["tokenizer"]
        prompts = [t.format(c) for c in classes for t in templates]
        with torch.no_grad():
            emb = self.model.encode_text(tokenizer(prompts).to(self.device)).float()
        return emb.view(len(classes), len(templates), -1)

    def prepare_metrics(self, metrics: nn.ModuleDict, stage: str) -> None:
        classifier = self._classifier()
        metrics.zero_shot_on = classifier is not None
        if classifier is not None:
            metrics["zero_shot"].set_classifier(classifier)

    def eval_batch(self, metrics: nn.ModuleDict, batch: dict[str, Tensor], dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            metrics["retrieval"].update_images(self.model.encode_image(batch["image"]).float(), batch["index"])
        elif dataloader_idx == 1:
            metrics["retrieval"].update_texts(self.model.encode_text(batch["text"]).float(), batch["index"], batch["image_index"])
        else:
            metrics["zero_shot"].update(self.model.encode_image(batch["image"]).float(), batch["label"], batch["index"])

    def compute_metrics(self, metrics: nn.ModuleDict) -> dict[str, float]:
        values = {k: float(v) for k, v in metrics["retrieval"].compute().items()}
        metrics["retrieval"].reset()
        if getattr(metrics, "zero_shot_on", False):
            values.update({f"zero_shot_{k}": float(v) for k, v in metrics["zero_shot"].compute().items()})
            metrics["zero_shot"].reset()
        return values


class _Call(nn.Module):
    """``owner.<method>`` as a module: ``GradCache`` calls ``encoder(chunk)`` and reads its parameters
    and buffers, which are the owner's (not registered twice: the owner is not a submodule)."""

    def __init__(self, owner: nn.Module, method: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.method = method

    def forward(self, x: Tensor) -> Tensor:
        return getattr(self.owner, self.method)(x)

    def parameters(self, recurse: bool = True):
        return self.owner.parameters(recurse)

    def buffers(self, recurse: bool = True):
        return self.owner.buffers(recurse)

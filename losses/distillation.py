"""Distillation losses: align the student's scores of each query's candidates with a teacher's.

Every query has candidates ``[positive, negative_1 .. negative_k]`` (its paired document and its
hard negatives); the student scores them from its embeddings (``candidate_scores``), a teacher
(``models.scorers``: a cross-encoder, a stronger bi-encoder, scores from a file) scores the same
pairs, and the loss compares the two ``[B, 1 + k]`` matrices row by row:

- ``KLDistillationLoss``: the KL divergence between the teacher's and the student's softmax over
  the candidates (soft targets, Hinton et al., "Distilling the Knowledge in a Neural Network", 2015,
  Sec. 2; RocketQAv2, Ren et al., "RocketQAv2: A Joint Training Method for Dense Passage Retrieval
  and Passage Re-ranking", EMNLP 2021, dynamic listwise distillation: ``KL(re-ranker || retriever)``
  over a query's candidate list), or the symmetric form of UniME-V2 (Gu et al., "UniME-V2: MLLM-as-a-Judge for Universal
  Multimodal Embedding Learning", 2025, Sec. 3.2, the MLLM-judgment-based distribution alignment:
  ``L = 1/2 (KL(P || Q) + KL(Q || P))`` with ``P`` the softmax of the judge's soft semantic matching
  scores and ``Q`` the softmax of the embedding model's similarities over ``[positive; hard
  negatives]`` of each query, both at a temperature; the 1/2 and the same row-wise form are those
  of the authors' released ``SoftLabelSoftKLContrastiveLoss``; I did not read the equation's number
  in the paper itself);
- ``MarginMSELoss``: Hofstätter et al., "Improving Efficient Neural Ranking Models with
  Cross-Architecture Knowledge Distillation" (2020), Eq. 1: ``MSE(M_s(q, d+) - M_s(q, d-),
  M_t(q, d+) - M_t(q, d-))`` per (query, negative); equal to sentence-transformers' ``MarginMSELoss``
  (dot-product student scores by default, as theirs).

Inputs: ``student [B, 1 + k]`` (with gradient), ``teacher [B, 1 + k]`` (no gradient; NaN: no
teacher score), optional ``valid [B, 1 + k]`` bool (False: an empty slot, e.g. a ``-1`` negative).
Column 0 is the positive; a row whose positive is invalid is left out.

Teacher filter (``teacher_filter``): a candidate the teacher scores above the positive
(``t_j > t_0``) is likely a false negative (RocketQA, Qu et al., NAACL 2021, denoises its hard
negatives with a cross-encoder the same way):

- ``None``: kept as the teacher scores it;
- ``"drop"``: left out of the row (out of both softmaxes; no margin term);
- ``"downweight"``: weight ``w_j = min(1, exp(-(t_j - t_0) / tau))``: 1 at or below the positive,
  decaying with the excess. ``KLDistillationLoss`` (``tau = temperature_teacher``) multiplies the
  teacher's probability of ``j`` by ``w_j`` before renormalising, which is the same as capping the
  teacher's score at the positive's; ``MarginMSELoss`` (``tau = downweight_temperature``) multiplies
  that negative's squared error by ``w_j`` (the mean still divides by the number of terms).

``DualEncoderModule(teacher=..., distillation_loss=..., distillation_weight=...)`` computes the
student scores with ``candidate_scores(q, d, neg, similarity=loss.similarity)`` from its embeddings
and adds ``distillation_weight * loss`` to the step's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TEACHER_FILTERS = (None, "drop", "downweight")
SIMILARITIES = ("cosine", "dot")


def candidate_scores(query: Tensor, positive: Tensor, negatives: Tensor | None = None, similarity: str = "cosine") -> Tensor:
    """The student's scores ``[B, 1 + k]``: ``query [B, D]`` against its ``positive [B, D]`` and its
    ``negatives [B * k, D]`` (query-major, as ``neg_*`` batches), by cosine or dot product."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"candidate_scores: similarity={similarity!r}; expected one of {SIMILARITIES}")
    if query.shape != positive.shape:
        raise ValueError(f"candidate_scores: query {tuple(query.shape)} and positive {tuple(positive.shape)} must both be [B, D]")
    cands = positive.unsqueeze(1)
    if negatives is not None and len(negatives):
        if len(negatives) % len(query) or negatives.shape[1] != query.shape[1]:
            raise ValueError(f"candidate_scores: negatives {tuple(negatives.shape)}; expected [B * k, {query.shape[1]}] with B = {len(query)}")
        cands = torch.cat([cands, negatives.view(len(query), -1, query.shape[1])], 1)
    if similarity == "cosine":
        query, cands = F.normalize(query, dim=-1), F.normalize(cands, dim=-1)
    return (query.unsqueeze(1) * cands).sum(-1)


class DistillationLoss(nn.Module):
    """Base: input checks, the valid mask and the teacher filter; a subclass writes ``compute``."""

    def __init__(self, teacher_filter: str | None = None, similarity: str = "cosine") -> None:
        super().__init__()
        if teacher_filter not in TEACHER_FILTERS:
            raise ValueError(f"{type(self).__name__}: teacher_filter={teacher_filter!r}; expected one of {TEACHER_FILTERS}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"{type(self).__name__}: similarity={similarity!r}; expected one of {SIMILARITIES}")
        self.teacher_filter, self.similarity = teacher_filter, similarity

    def forward(self, student: Tensor, teacher: Tensor, valid: Tensor | None = None) -> Tensor:
        name = type(self).__name__
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ValueError(f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} scores must both be [B, 1 + k]")
        if valid is not None and valid.shape != student.shape:
            raise ValueError(f"{name}: valid {tuple(valid.shape)}; expected {tuple(student.shape)}")
        teacher = teacher.detach().to(student.dtype)
        ok = torch.isfinite(teacher) if valid is None else valid.bool() & torch.isfinite(teacher)
        ok = ok & ok[:, :1]  # a row without a scored positive has no target
        teacher = torch.where(ok, teacher, torch.zeros_like(teacher))
        weight = torch.ones_like(teacher)
        above = torch.zeros_like(ok)
        above[:, 1:] = teacher[:, 1:] > teacher[:, :1]
        if self.teacher_filter == "drop":
            ok = ok & ~above
        elif self.teacher_filter == "downweight":
            weight = torch.where(above, torch.exp(-(teacher - teacher[:, :1]) / self.downweight_tau()), weight)
        return self.compute(student, teacher, ok, weight)

    def downweight_tau(self) -> float:
        return 1.0

    def compute(self, student: Tensor, teacher: Tensor, valid: Tensor, weight: Tensor) -> Tensor:
        """``valid``: the candidates that count (column 0 valid in every counted row); ``weight``: the
        filter's per-candidate weights (1 without ``"downweight"``)."""
        raise NotImplementedError


def _kl_rows(log_p: Tensor, log_q: Tensor, valid: Tensor) -> Tensor:
    """``KL(p || q)`` of every row over its valid columns (``0 log 0 = 0``)."""
    p = log_p.exp()
    terms = torch.where(valid & (p > 0), p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(1)


class KLDistillationLoss(DistillationLoss):
    """``KL(softmax(t / T_t) || softmax(s / T_s))`` over each query's valid candidates, mean over
    the queries with at least one valid negative (module docstring: Hinton et al. 2015; RocketQAv2);
    ``symmetric=True``: UniME-V2's ``1/2 (KL(P || Q) + KL(Q || P))``.

    Args:
        temperature_student: ``T_s`` of the student's scores (0.05 for cosine scores: scale 20).
        temperature_teacher: ``T_t`` of the teacher's scores (1.0 for cross-encoder logits).
        symmetric: the symmetric KL of UniME-V2.
        teacher_filter: ``None``, ``"drop"`` or ``"downweight"`` (module docstring; ``tau = T_t``).
        similarity: how the module scores the student's candidates (``"cosine"`` or ``"dot"``).
    """

    def __init__(
        self,
        temperature_student: float = 0.05,
        temperature_teacher: float = 1.0,
        symmetric: bool = False,
        teacher_filter: str | None = None,
        similarity: str = "cosine",
    ) -> None:
        super().__init__(teacher_filter, similarity)
        if temperature_student <= 0 or temperature_teacher <= 0:
            raise ValueError(f"KLDistillationLoss: temperatures must be > 0, got student {temperature_student}, teacher {temperature_teacher}")
        self.temperature_student, self.temperature_teacher, self.symmetric = temperature_student, temperature_teacher, symmetric

    def downweight_tau(self) -> float:
        return self.temperature_teacher

    def compute(self, student: Tensor, teacher: Tensor, valid: Tensor, weight: Tensor) -> Tensor:
        rows = valid[:, 1:].any(1)
        if not rows.any():
            return student.sum() * 0.0
        student, teacher, valid, weight = student[rows], teacher[rows], valid[rows], weight[rows]
        neg_inf = torch.finfo(student.dtype).min
        log_q = F.log_softmax(torch.where(valid, student / self.temperature_student, neg_inf), dim=1)
        log_p = F.log_softmax(torch.where(valid, teacher / self.temperature_teacher + weight.log(), neg_inf), dim=1)
        kl = _kl_rows(log_p, log_q, valid)
        if self.symmetric:
            kl = 0.5 * (kl + _kl_rows(log_q, log_p, valid))
        return kl.mean()

    def extra_repr(self) -> str:
        return (
            f"temperature_student={self.temperature_student}, temperature_teacher={self.temperature_teacher}, symmetric={self.symmetric}, "
            f"teacher_filter={self.teacher_filter!r}, similarity={self.similarity!r}"
        )


class MarginMSELoss(DistillationLoss):
    """Margin-MSE (Hofstätter et al. 2020, Eq. 1): ``mean_{(q, j)} w_j ((s_0 - s_j) - (t_0 - t_j))^2``
    over every query's valid negatives ``j``; sentence-transformers' ``MarginMSELoss`` on the same
    scores (``nn.MSELoss`` over the ``[B, k]`` margins) when every slot is valid and unfiltered.

    Args:
        teacher_filter: ``None``, ``"drop"`` or ``"downweight"`` (module docstring).
        downweight_temperature: ``tau`` of ``"downweight"`` (in the teacher's score units).
        similarity: the student's scores: ``"dot"`` (sentence-transformers' default) or ``"cosine"``.
    """

    def __init__(self, teacher_filter: str | None = None, downweight_temperature: float = 1.0, similarity: str = "dot") -> None:
        super().__init__(teacher_filter, similarity)
        if downweight_temperature <= 0:
            raise ValueError(f"MarginMSELoss: downweight_temperature must be > 0, got {downweight_temperature}")
        self.downweight_temperature = downweight_temperature

    def downweight_tau(self) -> float:
        return self.downweight_temperature

    def compute(self, student: Tensor, teacher: Tensor, valid: Tensor, weight: Tensor) -> Tensor:
        keep = valid[:, 1:]
        if not keep.any():
            return student.sum() * 0.0
        err = ((student[:, :1] - student[:, 1:]) - (teacher[:, :1] - teacher[:, 1:])) ** 2
        return (err * weight[:, 1:])[keep].sum() / keep.sum()

    def extra_repr(self) -> str:
        return f"teacher_filter={self.teacher_filter!r}, downweight_temperature={self.downweight_temperature}, similarity={self.similarity!r}"

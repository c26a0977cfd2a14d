"""``GuidedFilter``: a frozen guide model masks the in-batch candidates it scores above the positive.

Solatorio, "GISTEmbed: Guided In-sample Selection of Training Negatives for Text Embedding
Fine-tuning" (2024), Sec. 3: a guide model (a fixed, usually stronger, embedding model) scores
the query against every candidate of the contrastive loss (the other queries' positives and the
hard negatives); a candidate the guide finds at least as similar to the query as the query's own
positive is probably a false negative and is left out of the student's loss (its logit set to
``-inf`` in the paper, an ignored pair here). With guide similarities ``g(q, c)`` and the query's
positive ``d+``, a candidate ``c`` is ignored when

- ``mode="absolute"``: ``g(q, c) > g(q, d+) - margin``;
- ``mode="relative"``: ``g(q, c) > g(q, d+) - |g(q, d+)| * margin`` (``= g(q, d+) * (1 - margin)``
  for a non-negative positive score),

the conditions and names of sentence-transformers' ``GISTEmbedLoss`` (``margin_strategy``). The
positives of the query (its relevance, by ids) are never masked.

The filter does not compute a loss and knows nothing of ranks: ``encode(texts)`` embeds raw strings
with the guide (L2-normalised, no gradient), and ``forward(query_emb, cand_emb, pos_col)`` returns
the ignore mask ``[Q, M]`` from guide embeddings. ``DualEncoderModule(guide=GuidedFilter(...))``
reads the batch's raw texts (``TextInputs(keep_text=True)``: the guide has its own tokenizer),
gathers the guide embeddings across ranks like the step gathers the student's, and adds the mask
to the step's ignored pairs over ``[all ranks' positives; all ranks' hard negatives]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GUIDE_MODES = ("absolute", "relative")


class GuidedFilter(nn.Module):
    """GISTEmbed's guided false-negative filter (module docstring).

    Args:
        guide: a text encoder with ``encode(texts) -> [N, D]`` (``models.HFTextEncoder``; the
            packaged all-MiniLM-L6-v2: ``models.create_encoder("minilm-l6")``, the guide of the
            paper's smaller runs); frozen here and kept in eval mode.
        margin: how far below the positive's guide score a candidate may score and still count as a
            negative (0: anything scoring above the positive is masked).
        mode: ``"absolute"`` or ``"relative"``.
        batch_size: texts per ``guide.encode`` call.
    """

    def __init__(self, guide: nn.Module, margin: float = 0.0, mode: str = "absolute", batch_size: int = 64) -> None:
        super().__init__()
        if mode not in GUIDE_MODES:
            raise ValueError(f"GuidedFilter: mode={mode!r}; expected one of {GUIDE_MODES}")
        if not hasattr(guide, "encode"):
            raise TypeError(f"GuidedFilter: the guide {type(guide).__name__} has no encode(texts); expected e.g. models.HFTextEncoder")
        self.guide, self.margin, self.mode, self.batch_size = guide, float(margin), mode, batch_size
        self.guide.requires_grad_(False)
        self.guide.eval()

    def train(self, mode: bool = True) -> GuidedFilter:
        # the guide is fixed: no dropout whatever the LightningModule's mode
        return super().train(False)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> Tensor:
        """``texts [N] -> [N, D]`` L2-normalised guide embeddings (float32, without gradient)."""
        if len(texts) == 0:
            dim = getattr(self.guide, "embed_dim", 0)
            return torch.zeros(0, dim if isinstance(dim, int) else 0)
        return F.normalize(self.guide.encode(list(texts), batch_size=self.batch_size).float(), dim=-1)

    def false_negatives(self, scores: Tensor, pos_scores: Tensor) -> Tensor:
        """``scores [Q, M]`` guide similarities, ``pos_scores [Q]`` of each query's positive -> bool
        ``[Q, M]``: the candidates above the threshold (the positive's own column included)."""
        pos = pos_scores.view(-1, 1)
        if self.mode == "absolute":
            return scores > pos - self.margin
        return scores > pos - pos.abs() * self.margin

    @torch.no_grad()
    def forward(self, query_emb: Tensor, cand_emb: Tensor, pos_col: Tensor, positives: Tensor | None = None) -> Tensor:
        """``query_emb [Q, D]``, ``cand_emb [M, D]`` guide embeddings (``encode``); ``pos_col [Q]``: the
        column of each query's paired positive in ``cand_emb``; ``positives [Q, M]`` bool: every known
        positive (never masked; the paired one never is). Returns the ignore mask ``[Q, M]``."""
        if query_emb.dim() != 2 or cand_emb.dim() != 2 or query_emb.shape[1] != cand_emb.shape[1]:
            raise ValueError(f"GuidedFilter: query_emb {tuple(query_emb.shape)} and cand_emb {tuple(cand_emb.shape)} must be [Q, D] and [M, D]")
        if pos_col.shape != (len(query_emb),):
            raise ValueError(f"GuidedFilter: pos_col has shape {tuple(pos_col.shape)}; expected [{len(query_emb)}] (a column per query)")
        scores = query_emb.float() @ cand_emb.float().T
        rows = torch.arange(len(scores), device=scores.device)
        mask = self.false_negatives(scores, scores[rows, pos_col])
        mask[rows, pos_col] = False
        if positives is not None:
            mask = mask & ~positives.to(mask.device).bool()
        return mask

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mode={self.mode!r}"

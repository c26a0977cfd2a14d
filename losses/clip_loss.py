"""Image-text contrastive losses: CLIP's symmetric softmax and SigLIP's pairwise sigmoid.

These are *two-view* losses: they compare two sets of embeddings (images and captions, queries and
documents) through a logit matrix, with the logit scale (and bias) a parameter of the model, not of
the loss, as in open_clip. They do not subclass ``BaseLoss`` (which takes one set of embeddings,
labels and mined tuples); their interface is::

    loss(image_emb [B, D], text_emb [B, D], logit_scale, logit_bias=None, *, pos_mask=None, ignore_mask=None)
    loss.directional(query_emb [Q, D], ref_emb [R, D], logit_scale, logit_bias=None, *, pos_mask=None, ignore_mask=None)

``two_view = True`` tells the shared training step (``lightning_modules.step``) to call
``directional`` itself, once per direction (``symmetric = True``: image->text and text->image,
averaged; ``symmetric = False``: image->text only), on this rank's rows against the gathered rows
(open_clip's ``local_loss``) or on the global batch. ``forward`` is the one-process composition of
the same calls, so the two agree by construction.

Conventions shared by every two-view loss here:

- ``logit_scale`` is already exponentiated (a scalar tensor or a float), as open_clip passes
  ``model.logit_scale.exp()``; ``logit_bias`` is added as is. Embeddings are used as given (the
  encoders normalise them, as open_clip's do).
- ``pos_mask: [Q, R]`` bool, the positive pairs; ``None`` means the diagonal (query ``i`` matches
  reference ``i``), which needs ``Q == R``. ``ignore_mask: [Q, R]`` bool, pairs that are neither
  positive nor negative (a duplicate caption, a known false negative); an ignored pair is dropped
  even when it is also in ``pos_mask``. ``forward`` transposes both masks for text->image.
- Logits and losses are computed in float32 when the embeddings are half precision
  (``contracts.dtypes.work_dtype``); the returned scalar has the embeddings' dtype, as every
  ``BaseLoss`` does.

At world size 1 both losses equal open_clip 3.3's ``ClipLoss`` / ``SigLipLoss`` in value and
gradients (``tests/losses/test_clip_losses.py``), and for ``W`` ranks the mean over ranks of
``directional(rows of rank r, all rows, pos_mask=offset diagonal)`` equals open_clip's
``local_loss=True`` per-rank values averaged, which is the global loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.dtypes import work_dtype
from losses.pair_matrix import weighted_logsumexp


# ------------------------------------------------------------------------------------ helpers
def check_two_view(
    who: str,
    query_emb: Tensor,
    ref_emb: Tensor,
    pos_mask: Tensor | None,
    ignore_mask: Tensor | None,
    query_name: str = "query_emb",
    ref_name: str = "ref_emb",
) -> tuple[Tensor | None, Tensor | None]:
    """Check ``query_emb [Q, D]``, ``ref_emb [R, D]`` and the ``[Q, R]`` bool masks; return the masks on the embeddings' device.

    ``pos_mask=None`` (the diagonal) needs ``Q == R``; a mask that is not bool or has another shape is
    refused rather than guessed at (a float mask could be soft weights, an int mask could be indices).
    """
    for name, emb in ((query_name, query_emb), (ref_name, ref_emb)):
        if not isinstance(emb, Tensor) or emb.dim() != 2:
            shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"{who}: {name} has shape {shape}; expected a 2-d tensor [N, D] of embeddings")
        if not emb.is_floating_point():
            raise ValueError(f"{who}: {name} has dtype {emb.dtype}; expected floating-point embeddings")
    q, r = len(query_emb), len(ref_emb)
    if query_emb.shape[1] != ref_emb.shape[1]:
        raise ValueError(f"{who}: {query_name} has dimension {query_emb.shape[1]} but {ref_name} has {ref_emb.shape[1]}; both must be [N, D] with the same D")
    if pos_mask is None and q != r:
        raise ValueError(
            f"{who}: pos_mask=None means the diagonal (row i of {query_name} matches row i of {ref_name}), which needs as many "
            f"rows in both; got {q} and {r}. Pass pos_mask [{q}, {r}] (bool) for unequal sets (e.g. local rows against the gathered batch)"
        )
    out = []
    for name, mask in (("pos_mask", pos_mask), ("ignore_mask", ignore_mask)):
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(f"{who}: {name} has dtype {kind}; expected a bool tensor [{q}, {r}] ({query_name} rows x {ref_name} rows)")
            if tuple(mask.shape) != (q, r):
                raise ValueError(f"{who}: {name} has shape {tuple(mask.shape)}; expected [{q}, {r}] ({query_name} rows x {ref_name} rows)")
            mask = mask.to(query_emb.device)
        out.append(mask)
    return out[0], out[1]


def scalar_param(who: str, name: str, value: Tensor | float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``logit_scale`` / ``logit_bias`` as a 0-d tensor of ``dtype`` (keeping its gradient); a float becomes a constant."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: {name} has shape {tuple(value.shape)}; expected a scalar (0-d or one-element tensor, or a float)")
        return value.reshape(()).to(dtype=dtype, device=device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=dtype, device=device)
    raise ValueError(f"{who}: {name} is a {type(value).__name__}; expected a float or a scalar tensor")


def pair_logits(who: str, query_emb: Tensor, ref_emb: Tensor, logit_scale: Tensor | float, logit_bias: Tensor | float | None) -> Tensor:
    """``s * q r^T (+ b)``: ``[Q, R]`` in the work dtype (float32 for half-precision embeddings)."""
    dtype = work_dtype(query_emb.dtype)
    q, r = query_emb.to(dtype), ref_emb.to(dtype)
    scale = scalar_param(who, "logit_scale", logit_scale, dtype, q.device)
    logits = (scale * q) @ r.T  # the order open_clip multiplies in, so float rounding matches too
    if logit_bias is not None:
        logits = logits + scalar_param(who, "logit_bias", logit_bias, dtype, q.device)
    return logits


def transpose_mask(mask: Tensor | None) -> Tensor | None:
    return None if mask is None else mask.T


def positive_softmax_loss(logits: Tensor, pos_mask: Tensor | None, ignore_mask: Tensor | None) -> Tensor:
    """The softmax (InfoNCE) loss of a ``[Q, R]`` logit matrix with any number of positives per row.

    Each positive ``p`` of row ``i`` is contrasted with the row's negatives only (neither positive
    nor ignored), so a second positive (a duplicate caption) is never pushed away::

        l(i, p) = -log( exp(l_ip) / (exp(l_ip) + sum_{n not in P(i) u I(i)} exp(l_in)) )

    A row's loss is the mean of ``l(i, p)`` over its positives; the result is the mean over the rows
    that have at least one positive (0, keeping the graph, when none has). With the diagonal as the
    only positive and nothing ignored this is ``F.cross_entropy(logits, arange(Q))`` (the path taken
    when ``pos_mask`` and ``ignore_mask`` are both None).
    """
    n = len(logits)
    if pos_mask is None and ignore_mask is None:
        if n == 0:
            return logits.sum() * 0
        return F.cross_entropy(logits, torch.arange(n, device=logits.device))
    pos = torch.eye(n, logits.shape[1], dtype=torch.bool, device=logits.device) if pos_mask is None else pos_mask
    if ignore_mask is not None:
        pos = pos & ~ignore_mask
        neg = ~(pos | ignore_mask)
    else:
        neg = ~pos
    n_pos = pos.sum(1)
    rows = n_pos > 0
    if not bool(rows.any()):
        return logits.sum() * 0
    neg_lse = weighted_logsumexp(logits, neg)  # -inf with zero gradient for a row without negatives
    terms = torch.logaddexp(logits, neg_lse.unsqueeze(1)) - logits  # [Q, R]; finite everywhere
    terms = torch.where(pos, terms, torch.zeros((), dtype=terms.dtype, device=terms.device))
    per_row = terms.sum(1)[rows] / n_pos[rows].to(terms.dtype)
    return per_row.mean()


# ------------------------------------------------------------------------------------- losses
class CLIPLoss(nn.Module):
    """CLIP's symmetric contrastive loss (InfoNCE over image->text and text->image logits).

    Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP,
    ICML 2021), Figure 3 (``loss = (loss_i + loss_t) / 2`` with cross-entropy over the rows and the
    columns of ``exp(t) * I_e T_e^T``); the InfoNCE objective of van den Oord et al., "Representation
    Learning with Contrastive Predictive Coding" (2018), Eq. 4. Equal to open_clip 3.3's
    ``open_clip.loss.ClipLoss()(image, text, logit_scale, logit_bias)`` at world size 1.

    ``forward(image, text, s, b) = (directional(image, text) + directional(text, image)) / 2`` with the
    masks transposed for the second term. ``directional`` is ``positive_softmax_loss`` on
    ``s * q r^T (+ b)``: one term per positive against the row's negatives, the mean over a row's
    positives, then over rows with a positive (a row without one is left out). With the diagonal as
    positives and nothing ignored, exactly ``F.cross_entropy`` over each row as open_clip.

    Distributed (the shared step, ``gather="local"``): rank ``r`` calls ``directional(image_r,
    text_all, pos_mask=diagonal at offset start_r)`` and the same for text->image; the mean over
    ranks of those per-rank losses is the global loss (open_clip's ``local_loss=True``).

    Args:
        symmetric: False keeps the first direction only (query -> document InfoNCE with in-batch
            and hard negatives, sentence-transformers' ``MultipleNegativesRankingLoss``; its
            ``scale=20`` is ``logit_scale=20``, a temperature of 0.05).
    """

    two_view = True

    def __init__(self, symmetric: bool = True) -> None:
        super().__init__()
        self.symmetric = symmetric

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``image_emb: [B, D]``, ``text_emb: [B_t, D]``; masks ``[B, B_t]`` image rows x text rows. Scalar loss."""
        return self.both_directions(image_emb, text_emb, logit_scale, logit_bias, pos_mask, ignore_mask)

    def both_directions(self, image_emb, text_emb, logit_scale, logit_bias, pos_mask, ignore_mask, **image_to_text) -> Tensor:
        """image -> text (with ``image_to_text`` keywords, e.g. NegCLIP's ``extra_neg_emb``), and when
        ``symmetric`` text -> image over the transposed masks, averaged."""
        who = type(self).__name__
        pos_mask, ignore_mask = check_two_view(who, image_emb, text_emb, pos_mask, ignore_mask, "image_emb", "text_emb")
        i2t = self.directional(image_emb, text_emb, logit_scale, logit_bias, pos_mask=pos_mask, ignore_mask=ignore_mask, **image_to_text)
        if not self.symmetric:
            return i2t
        t2i = self.directional(text_emb, image_emb, logit_scale, logit_bias, pos_mask=transpose_mask(pos_mask), ignore_mask=transpose_mask(ignore_mask))
        return (i2t + t2i) / 2

    def directional(
        self,
        query_emb: Tensor,
        ref_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """The softmax loss of ``query_emb [Q, D]`` over ``ref_emb [R, D]`` (masks ``[Q, R]`` bool). Scalar loss."""
        who = f"{type(self).__name__}.directional"
        pos_mask, ignore_mask = check_two_view(who, query_emb, ref_emb, pos_mask, ignore_mask)
        logits = pair_logits(who, query_emb, ref_emb, logit_scale, logit_bias)
        return positive_softmax_loss(logits, pos_mask, ignore_mask).to(query_emb.dtype)


class SigLIPLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss.

    Zhai et al., "Sigmoid Loss for Language Image Pre-Training" (ICCV 2023), Eq. 1 and Algorithm 1::

        L = -1/|B| sum_i sum_j log sigmoid( z_ij * (t * x_i . y_j + b) ),   z_ij = +1 for a positive pair, -1 otherwise

    with ``t = logit_scale`` (already exponentiated) and ``b = logit_bias``; ``|B|`` is the number of
    query rows. Pairs in ``ignore_mask`` are dropped from the sum (still divided by ``Q``). Not
    symmetric (``symmetric = False``): ``forward(image, text, t, b) = directional(image, text, t, b)``,
    as the paper sums over all image-text pairs once. Equal to open_clip 3.3's
    ``open_clip.loss.SigLipLoss()(image, text, logit_scale, logit_bias)`` at world size 1 (its
    ``logit_scale`` is exponentiated too). For ``W`` ranks, rank ``r``'s open_clip loss is
    ``directional(image_r, text_all, pos_mask=diagonal at offset start_r)`` and their mean over ranks
    (equal slices) is the global loss.

    ``logit_bias`` is required (the paper initialises it to -10 so that the many negatives do not
    dominate the first steps); pass 0.0 explicitly for none. ``needs_logit_bias = True`` says so to the
    modules that own the bias (``DualEncoderModule(logit_bias=...)`` refuses to build without one).

    Any number of positives per row and extra negative columns fit Eq. 1 as they are: every
    non-ignored pair is one independent binary term, so a document relevant to two queries is a
    positive (``z = +1``) of both, and hard negatives appended to ``ref_emb`` are more ``z = -1`` pairs
    (still divided by ``Q``, the query rows, as the paper divides by ``|B|``).
    """

    two_view = True
    symmetric = False
    needs_logit_bias = True

    def forward(
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``image_emb: [B, D]``, ``text_emb: [B_t, D]``; masks ``[B, B_t]``. Scalar loss."""
        who = type(self).__name__
        check_two_view(who, image_emb, text_emb, pos_mask, ignore_mask, "image_emb", "text_emb")
        return self.directional(image_emb, text_emb, logit_scale, logit_bias, pos_mask=pos_mask, ignore_mask=ignore_mask)

    def directional(
        self,
        query_emb: Tensor,
        ref_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``-sum_{non-ignored (i, j)} log sigmoid(z_ij * l_ij) / Q`` for ``query_emb [Q, D]``, ``ref_emb [R, D]``. Scalar loss."""
        who = f"{type(self).__name__}.directional"
        if logit_bias is None:
            raise ValueError(f"{who}: logit_bias is None; SigLIP needs the learnable bias b of Eq. 1 (a scalar tensor, or 0.0 for none)")
        pos_mask, ignore_mask = check_two_view(who, query_emb, ref_emb, pos_mask, ignore_mask)
        logits = pair_logits(who, query_emb, ref_emb, logit_scale, logit_bias)
        q, r = logits.shape
        if q == 0:
            return logits.sum().to(query_emb.dtype) * 0
        pos = torch.eye(q, r, dtype=torch.bool, device=logits.device) if pos_mask is None else pos_mask
        signs = torch.where(pos, 1.0, -1.0).to(logits.dtype)
        terms = F.logsigmoid(signs * logits)
        if ignore_mask is not None:
            terms = torch.where(ignore_mask, torch.zeros((), dtype=terms.dtype, device=terms.device), terms)
        return (-terms.sum() / q).to(query_emb.dtype)

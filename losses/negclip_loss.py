"""CLIP losses with hard-negative captions (NegCLIP) and hard-negative image-caption pairs (TripletCLIP).

Both are two-view losses with the interface of ``losses.clip_loss`` (``two_view = True``,
``directional`` per direction) plus one extra argument: ``directional(..., extra_neg_emb=None)``
appends ``extra_neg_emb [N, D]`` as extra reference columns that are negatives for every query
(never positive, never ignored). Hard-negative captions enter the image->text direction only, so
the training step calls::

    directional(image, text, s, b, pos_mask=..., ignore_mask=..., extra_neg_emb=neg_text)   # image -> [text; neg_text]
    directional(text, image, s, b, pos_mask=pos.T, ignore_mask=ign.T)                        # text  -> images only

and averages the two (``hard_negatives_in = "image_to_text"`` records this). Under DDP the step
gathers ``neg_text`` like the captions (with gradient) and passes the gathered rows as
``extra_neg_emb``; with ``local_loss`` rank ``r`` passes its own image rows against every rank's
captions and hard negatives.
"""

from __future__ import annotations

import torch
from torch import Tensor

from losses.clip_loss import CLIPLoss, check_two_view, pair_logits, positive_softmax_loss


class NegCLIPLoss(CLIPLoss):
    """NegCLIP: CLIP's loss with hard-negative captions as extra columns of the image->text softmax.

    Yuksekgonul et al., "When and Why Vision-Language Models Behave like Bags-of-Words, and What to Do
    About It?" (ICLR 2023), the NegCLIP objective: for images ``X``, captions ``Y`` and hard-negative
    captions ``Y'`` (word-order perturbations of ``Y``)::

        L = ( CE_rows( s * X [Y; Y']^T ) + CE_rows( s * Y X^T ) ) / 2

    with the diagonal as targets: each image is contrasted with every true caption and every hard
    negative; each true caption with the images only (a hard negative caption is not a query).

    Code followed: the authors' training fork of open_clip, ``vinid/neg_clip``,
    ``src/open_clip/loss.py`` ``ClipLoss.forward`` (``cross_entropy(logits_per_image, labels)`` and
    ``cross_entropy(logits_per_text[:len(logits_per_image)], labels)``) with the batch built in
    ``src/training/train.py`` (texts ``= [captions; hard captions]``). Differences:

    - The authors also concatenate hard-negative *images* (nearest neighbours) and their captions
      to the batch. Those are ordinary image-caption pairs here: append them to ``image_emb`` /
      ``text_emb`` (and their hard captions to ``neg_text_emb``), which gives the same matrix.
    - Their positives are ``arange`` labels into the concatenated text features; with several
      ranks the gathered texts interleave ``[captions_0; hard_0; captions_1; ...]`` so, as we read
      it, labels for ranks > 0 would point at another rank's rows. Here positives are explicit
      (``pos_mask``, the diagonal by default) and hard negatives are separate columns, so gathering
      is exact. An optional ``logit_bias`` is accepted (open_clip's ``ClipLoss`` takes one).
    - ``pos_mask`` / ``ignore_mask`` (``[B, B]`` image x caption) allow several positives per row
      (duplicate captions), as ``CLIPLoss``.

    Args of ``forward``: ``image_emb [B, D]``, ``text_emb [B, D]``, ``neg_text_emb [B_neg, D]`` (any
    number, 0 gives ``CLIPLoss``), ``logit_scale`` (exponentiated), ``logit_bias`` (optional).
    """

    #: the direction whose queries see ``extra_neg_emb``: image rows against ``[captions; hard negatives]``
    hard_negatives_in = "image_to_text"

    def forward(  # type: ignore[override]
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        neg_text_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``(directional(image, text, extra_neg_emb=neg_text) + directional(text, image)) / 2``. Scalar loss."""
        return self.both_directions(image_emb, text_emb, logit_scale, logit_bias, pos_mask, ignore_mask, extra_neg_emb=neg_text_emb)

    def directional(  # type: ignore[override]
        self,
        query_emb: Tensor,
        ref_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
        extra_neg_emb: Tensor | None = None,
    ) -> Tensor:
        """``CLIPLoss.directional`` over the columns ``[ref_emb; extra_neg_emb]``: ``extra_neg_emb [N, D]`` are
        negatives of every query. Masks are ``[Q, R]`` over ``ref_emb`` only. Scalar loss."""
        who = f"{type(self).__name__}.directional"
        pos_mask, ignore_mask = check_two_view(who, query_emb, ref_emb, pos_mask, ignore_mask)
        logits = pair_logits(who, query_emb, ref_emb, logit_scale, logit_bias)
        if extra_neg_emb is not None:
            if not isinstance(extra_neg_emb, Tensor) or extra_neg_emb.dim() != 2 or extra_neg_emb.shape[1] != query_emb.shape[1]:
                shape = tuple(extra_neg_emb.shape) if isinstance(extra_neg_emb, Tensor) else type(extra_neg_emb).__name__
                raise ValueError(f"{who}: extra_neg_emb has shape {shape}; expected [N, {query_emb.shape[1]}] (hard negatives, the dimension of query_emb)")
            extra = pair_logits(who, query_emb, extra_neg_emb, logit_scale, logit_bias)
            logits = torch.cat([logits, extra], dim=1)
            # the diagonal default (pos_mask None, nothing ignored) stays the cross-entropy path: labels 0..Q-1 index ref_emb's columns
            if pos_mask is not None or ignore_mask is not None:
                q, r, n = len(query_emb), len(ref_emb), len(extra_neg_emb)
                pad = torch.zeros(q, n, dtype=torch.bool, device=logits.device)
                pos = torch.eye(q, r, dtype=torch.bool, device=logits.device) if pos_mask is None else pos_mask
                pos_mask = torch.cat([pos, pad], dim=1)
                ignore_mask = None if ignore_mask is None else torch.cat([ignore_mask, pad], dim=1)
        return positive_softmax_loss(logits, pos_mask, ignore_mask).to(query_emb.dtype)


class TripletCLIPLoss(NegCLIPLoss):
    """TripletCLIP: NegCLIP on the real pairs and on the synthetic negative pairs, each the other's hard negatives.

    Patel et al., "TripletCLIP: Improving Compositional Reasoning of CLIP via Synthetic
    Vision-Language Negatives" (NeurIPS 2024), its training objective: with images ``X``, captions ``Y``, negative
    images ``X'`` and negative captions ``Y'`` (``(X'_i, Y'_i)`` a synthetic pair contradicting
    ``(X_i, Y_i)``)::

        L = L_NegCLIP(X, Y, Y') + L_NegCLIP(X', Y', Y)

    summed, at every step. Code followed: the official ``src/openclip/src/loss.py``
    (``tripletclip_loss`` = ``negclip_loss(img, text, neg_text) + negclip_loss(neg_img, neg_text, text)``,
    called on every batch by ``src/openclip/src/train.py``); its accuracy output is not computed here.
    ``L_NegCLIP`` is ``NegCLIPLoss.forward`` (see there).

    Args of ``forward``: ``image_emb [B, D]``, ``text_emb [B, D]``, ``neg_image_emb [B', D]``,
    ``neg_text_emb [B', D]``, ``logit_scale`` (exponentiated), ``logit_bias`` (optional);
    ``pos_mask`` / ``ignore_mask`` ``[B, B]`` for ``(X, Y)`` and ``neg_pos_mask`` / ``neg_ignore_mask``
    ``[B', B']`` for ``(X', Y')`` (default: the diagonal, nothing ignored).

    For the training step this is four ``directional`` calls: ``(X -> [Y; Y'])``, ``(Y -> X)``,
    ``(X' -> [Y'; Y])``, ``(Y' -> X')``, averaged in pairs and the two pairs summed.
    """

    def forward(  # type: ignore[override]
        self,
        image_emb: Tensor,
        text_emb: Tensor,
        neg_image_emb: Tensor,
        neg_text_emb: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
        neg_pos_mask: Tensor | None = None,
        neg_ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``NegCLIP(X, Y, Y') + NegCLIP(X', Y', Y)``. Scalar loss."""
        who = type(self).__name__
        check_two_view(who, image_emb, text_emb, pos_mask, ignore_mask, "image_emb", "text_emb")
        check_two_view(who, neg_image_emb, neg_text_emb, neg_pos_mask, neg_ignore_mask, "neg_image_emb", "neg_text_emb")
        real = super().forward(image_emb, text_emb, neg_text_emb, logit_scale, logit_bias, pos_mask=pos_mask, ignore_mask=ignore_mask)
        synthetic = super().forward(neg_image_emb, neg_text_emb, text_emb, logit_scale, logit_bias, pos_mask=neg_pos_mask, ignore_mask=neg_ignore_mask)
        return real + synthetic

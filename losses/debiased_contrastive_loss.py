"""Debiased contrastive loss (DCL)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import Mined
from losses.base_loss import BaseLoss
from losses.pair_matrix import any_mined, softmax_pairs, weighted_logsumexp


class DebiasedContrastiveLoss(BaseLoss):
    """InfoNCE whose negative term corrects for false negatives drawn with class prior ``tau_plus``.

    Chuang et al., "Debiased Contrastive Learning" (NeurIPS 2020), Section 4: the objective
    ``L^{N,M}_Debiased`` with the estimator ``g(x, {u_i}_1^N, {v_j}_1^M)`` of the negative term.
    For every positive pair ``(a, p)``, with ``e_k = exp(s_ak / t)``::

        g_a    = max( (1/N_a sum_{n in N(a)} w-_an e_n  -  tau_plus * 1/M_a sum_{v in P(a)} w+_av e_v) / (1 - tau_plus),
                      exp(-1 / t) )
        l(a,p) = -w+_ap * log( e_p / (e_p + N_a * g_a) )

    ``N(a)`` are the anchor's mined negatives (the paper's ``u_i``, which may secretly be positives),
    ``P(a)`` its mined positives (the paper's ``M`` extra positives ``v_j``; with one positive per
    anchor, as in two-view SimCLR, this is the authors' code with ``M = 1``),
    ``N_a = sum_n w-_an`` and ``M_a = sum_v w+_av`` (the counts when unweighted). The clamp at
    ``exp(-1/t)``, the smallest value ``exp(s / t)`` takes for a cosine similarity, keeps the
    estimate positive. The loss is the mean of ``l`` over the positive pairs; a pair whose anchor has
    no negative gives 0; with no positive or no negative pair at all the loss is 0. With
    ``tau_plus = 0`` and an inactive clamp it equals ``NTXentLoss``.

    ``s`` is the similarity, or minus the distance for a distance. Weights: ``pos_weights`` multiply a
    positive pair's term and its exponential in the positive mean; ``neg_weights`` multiply a
    negative's exponential (weighted empirical means). Duplicate pairs count once per listing.
    Computed in log space, ``O(B * M)`` memory.

    Args:
        temperature: the temperature ``t``.
        tau_plus: the class prior ``tau+`` in ``[0, 1)``: the probability that a negative is a positive.
        distance: default ``CosineSimilarity()``.
    """

    def __init__(self, temperature: float = 0.5, tau_plus: float = 0.1, distance: BaseDistance | None = None) -> None:
        super().__init__(distance=distance)
        if temperature <= 0:
            raise ValueError(f"DebiasedContrastiveLoss: temperature must be > 0, got {temperature}")
        if not 0 <= tau_plus < 1:
            raise ValueError(f"DebiasedContrastiveLoss: tau_plus must be in [0, 1), got {tau_plus}")
        self.temperature = temperature
        self.tau_plus = tau_plus

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        dtype = work_dtype(inputs.emb.dtype)
        a1, p, pw, pos_w, neg_w = softmax_pairs(inputs, mined, dtype)
        if len(a1) == 0 or not any_mined(neg_w):
            return self.zero_loss(inputs)
        mat = self.distance(inputs.emb, inputs.ref_emb).to(dtype)
        logits = (mat if self.distance.is_inverted else -mat) / self.temperature
        n_neg, n_pos = neg_w.sum(dim=1, dtype=dtype), pos_w.sum(dim=1, dtype=dtype)
        valid = (n_neg > 0) & (n_pos > 0)
        ones = torch.ones_like(n_neg)
        # Rows without negatives or positives would give -inf - -inf; they only feed zero terms.
        log_mean_neg = torch.where(valid, weighted_logsumexp(logits, neg_w) - torch.where(valid, n_neg, ones).log(), 0 * ones)
        log_mean_pos = torch.where(valid, weighted_logsumexp(logits, pos_w) - torch.where(valid, n_pos, ones).log(), 0 * ones)
        log_g = self._log_estimator(log_mean_neg, log_mean_pos)
        log_ng = torch.where(valid, torch.where(valid, n_neg, ones).log() + log_g, torch.full_like(log_g, float("-inf")))
        pos = logits[a1, p]
        losses = torch.logaddexp(pos, log_ng[a1]) - pos
        if pw is not None:
            losses = losses * pw.to(losses.dtype)
        return losses.mean().to(inputs.emb.dtype)

    def _log_estimator(self, log_mean_neg: Tensor, log_mean_pos: Tensor) -> Tensor:
        """``log g = log max((E_neg - tau+ E_pos) / (1 - tau+), exp(-1/t))`` from the logs of both means ``[B]``."""
        floor = torch.full_like(log_mean_neg, -1.0 / self.temperature)
        if self.tau_plus == 0:
            return torch.maximum(log_mean_neg, floor)
        # E_neg - tau+ E_pos = E_neg (1 - r) with log r = log tau+ + log E_pos - log E_neg; the clamp wins when r >= 1.
        log_r = math.log(self.tau_plus) + log_mean_pos - log_mean_neg
        positive = log_r < 0
        log_r = torch.where(positive, log_r, -torch.ones_like(log_r))
        debiased = log_mean_neg + torch.log(-torch.expm1(log_r)) - math.log1p(-self.tau_plus)
        return torch.where(positive, torch.maximum(debiased, floor), floor)

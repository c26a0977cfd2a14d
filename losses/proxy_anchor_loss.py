"""Proxy-Anchor loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contracts.distances import BaseDistance, CosineSimilarity
from contracts.dtypes import work_dtype
from contracts.inputs import Inputs
from contracts.mined import check_weights
from contracts.mined import Mined
from contracts.relevance import label_masks
from losses.base_loss import BaseLoss
from losses.mixing import soft_class_targets
from losses.pair_matrix import log1p_sum, weighted_logsumexp


class ProxyAnchorLoss(BaseLoss):
    """One learnable proxy per class; each proxy is an anchor that pulls its class and pushes the rest.

    Kim et al., "Proxy Anchor Loss for Deep Metric Learning" (CVPR 2020), Eq. 4::

        L = 1/|P+| sum_{c in P+} log(1 + sum_{x in X_c}  v_x exp(-alpha (s(x, c) - margin)))
          + 1/|C|  sum_{c in C}  log(1 + sum_{x not in X_c} v_x exp( alpha (s(x, c) + margin)))

    where ``P+`` are the classes present in the batch, ``C`` all ``num_classes`` proxies and ``s``
    the similarity to the proxy (the signs follow ``distance.margin`` for a distance).

    Mined tuples and weights (pytorch-metric-learning's semantics): without ``mined`` every
    ``v_x = 1``. With ``mined``, each tuple adds its weight (1 when unweighted) to the count of
    every batch row it names (anchor, positive and negative, or both pair members), the counts are
    divided by their maximum to give ``u_x`` in [0, 1], and ``v_x = exp(u_x - 1)``: rows never mined
    are down-weighted by ``e^-1``, not dropped. An empty ``Mined`` (or all weights 0) gives loss 0
    (PML treats an empty tuple like ``None``). Without weights the value equals PML 2.9's
    ``ProxyAnchorLoss`` with the same proxies.

    Synthetic points (``Mined.mix``): extra rows whose class labels are soft
    (``losses.mixing.soft_class_targets``): row ``x`` counts ``y_c(x)`` in the positive sum of proxy
    ``c`` and ``1 - y_c(x)`` in its negative sum, with ``v_x = 1``. This is Metrix's Proxy-Anchor
    (Venkataramanan et al., "It Takes Two to Tango", ICLR 2022): a mix of a class-``c`` example with
    a negative at ``lambda`` has its positive term for proxy ``c`` weighted by ``lambda`` and its
    negative term by ``1 - lambda``. A ``Mined`` holding only a mix gives the loss of the synthetic
    rows alone (Metrix's mixed loss); with tuples too, the batch rows join with their ``v_x``.

    The proxies are an ``nn.Parameter [num_classes, embedding_size]`` initialised with
    ``kaiming_normal_(mode="fan_out")`` as in PML; give the loss's parameters to the optimizer.
    A separate reference set is not supported (proxies replace it).

    Args:
        num_classes: number of proxies; labels must be in ``[0, num_classes)``.
        embedding_size: embedding dimension ``D``.
        margin: the margin ``delta``.
        alpha: the scale.
        distance: default ``CosineSimilarity()``.
    """

    supports_ref_emb = False
    accepts_mix = True
    needs_class_labels = "its proxies are one per class, and labels say which proxy is each row's positive"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.1,
        alpha: float = 32.0,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__(distance=distance)
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.margin = margin
        self.alpha = alpha
        self.proxies = nn.Parameter(torch.empty(num_classes, embedding_size))
        nn.init.kaiming_normal_(self.proxies, mode="fan_out")

    def default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        emb, labels = inputs.emb, inputs.labels
        who = type(self).__name__
        if not inputs.same_set:
            raise ValueError(f"{who} does not take ref_emb/ref_labels: its proxies are the reference set")
        if inputs.pos_mask is not None and _ignores_pairs(inputs):
            raise ValueError(f"{who} does not take an ignore_mask that ignores pairs: it compares rows with class proxies, not with other rows")
        if emb.shape[1] != self.embedding_size:
            raise ValueError(f"{who}: embeddings have dimension {emb.shape[1]}; expected embedding_size={self.embedding_size}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(f"{who}: labels must be class indices in [0, {self.num_classes}), got range [{low}, {high}]")
        log_v = self._log_sample_weights(mined, len(emb), emb.device)
        dtype = work_dtype(emb.dtype)
        rows, targets = emb, F.one_hot(labels.long(), self.num_classes).to(dtype)
        if mined is not None and mined.mix is not None and len(mined.mix):
            # synthetic points are extra rows with soft class labels; batch rows join only if tuples name them
            points = mined.mix.materialize(emb).to(emb.dtype)
            soft = soft_class_targets(mined.mix, labels, None, self.num_classes).to(dtype)
            zeros = torch.zeros(len(points), device=emb.device, dtype=torch.float64)
            if log_v is None:
                rows, targets, log_v = points, soft, zeros
            else:
                rows, targets, log_v = torch.cat([emb, points]), torch.cat([targets, soft]), torch.cat([log_v, zeros])
        if len(rows) == 0 or log_v is None:
            return (self.zero_loss(inputs) + self.proxies.sum() * 0).to(emb.dtype)
        return self._soft_label_loss(rows, targets, log_v).to(emb.dtype)

    def apply_mix(self, inputs: Inputs, mined: Mined) -> tuple[Inputs, Mined]:
        """Synthetic points are not pairs here: ``compute_loss`` adds them as rows with soft class labels."""
        return inputs, mined

    def _soft_label_loss(self, rows: Tensor, targets: Tensor, log_v: Tensor) -> Tensor:
        """Eq. 4 with a class weight per row: ``rows: [N, D]``, ``targets: [N, C]`` in [0, 1], ``log_v: [N]``.

        Row ``x`` enters the positive sum of proxy ``c`` with weight ``targets[x, c]`` and its negative
        sum with ``1 - targets[x, c]`` (one-hot targets: the plain loss).
        """
        dtype = targets.dtype
        sim = self.distance(rows, self.proxies.to(rows.dtype)).to(dtype)  # [N, C]
        log_v = log_v.to(dtype).unsqueeze(1)
        pos_logits = self.alpha * self.distance.margin(sim, self.margin) + log_v
        neg_logits = self.alpha * self.distance.margin(-self.margin, sim) + log_v
        # per proxy (column): a weighted log-sum-exp over the rows of its class / of the other classes
        pos_term = log1p_sum(weighted_logsumexp(pos_logits, targets, dim=0))
        neg_term = log1p_sum(weighted_logsumexp(neg_logits, 1 - targets, dim=0))
        n_present = max(int((targets > 0).any(dim=0).sum()), 1)
        return pos_term.sum() / n_present + neg_term.sum() / self.num_classes

    @staticmethod
    def _log_sample_weights(mined: Mined | None, n: int, device: torch.device) -> Tensor | None:
        """``log v_x = u_x - 1`` per batch row ``[B]``; zeros without ``mined``; ``None`` if nothing is mined."""
        if mined is None:
            return torch.zeros(n, device=device)
        if mined.has_triplets:
            a, p, neg, w = mined.as_triplets()
            check_weights(w, "triplet_weights")
            index = torch.cat([a, p, neg])
            w = torch.ones(len(a), device=device) if w is None else w.float()
            values = torch.cat([w, w, w])
        else:
            a1, p, a2, neg, pw, nw = mined.as_pairs()
            check_weights(pw, "pos_weights")
            check_weights(nw, "neg_weights")
            index = torch.cat([a1, p, a2, neg])
            pw = torch.ones(len(a1), device=device) if pw is None else pw.float()
            nw = torch.ones(len(a2), device=device) if nw is None else nw.float()
            values = torch.cat([pw, pw, nw, nw])
        counts = torch.zeros(n, device=device, dtype=torch.float64).index_add_(0, index.to(device), values.to(device, torch.float64))
        top = counts.max() if len(counts) else counts.new_zeros(())
        if len(index) == 0 or float(top) <= 0:
            return None
        return counts / top - 1


def _ignores_pairs(inputs: Inputs) -> bool:
    """Whether the masks of ``inputs`` (labels + ``ignore_mask``) differ from those of the labels alone."""
    pos, neg = label_masks(inputs.labels, inputs.ref_labels, inputs.same_set)
    return not (torch.equal(pos, inputs.pos_mask) and torch.equal(neg, inputs.neg_mask))

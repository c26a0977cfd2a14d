"""``Metrix``: mixup for deep metric learning, in input, feature or embedding space."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance, LpDistance
from contracts.mined import Mined
from contracts.mix_spec import MixSpec
from contracts.inputs import resolve_inputs
from contracts.relevance import valid_pairs


class Metrix(nn.Module):
    """Metric Mix: mix an anchor's positives (or the anchor) with its negatives, with interpolated labels.

    Venkataramanan, Psomas, Kijak, Amsaleg, Karantzalos, Avrithis, "It Takes Two to Tango: Mixup for
    Deep Metric Learning" (ICLR 2022), Sec. 3. Every training step:

    1. Pairs (the official code, ``train.py``/``mixup/utils.py``): one kind per step, at random with
       ``pairs="alternate"``: *positive-negative*: for every positive ``p`` and negative ``n`` of an
       anchor ``a``, the mix ``m = lambda * x_p + (1 - lambda) * x_n`` compared with ``a``;
       *anchor-negative*: for an anchor without a positive in the batch, ``m = lambda * x_a + (1 -
       lambda) * x_n``. ``lambda ~ Beta(alpha, alpha)``, one per step. Pairs come from ``miner``
       when given (the official multi-similarity code mixes the multi-similarity miner's pairs),
       else from all pairs of the batch. A step whose kind has no candidate (anchor-negative with
       P x K batches, where every anchor has a positive) uses the other kind.
    2. Mixing, ``mode``: ``"input"`` (images; the official code keeps only the single hardest
       negative per anchor here), ``"feature"`` (the backbone's last feature map, before pooling and
       the embedding head: the paper's best and its default), ``"embedding"`` (the final vectors).
       ``negatives`` keeps only the ``k`` hardest negatives of each anchor.
    3. Label interpolation (the paper's mixed loss): ``m`` is a positive of ``a`` with weight ``lambda`` and a
       negative with weight ``1 - lambda``, through the loss's per-pair weights
       (``losses.mixing.append_mix_pairs``). The loss returned is ``w * L_mix``; the module adds it
       to the clean loss: ``L = L_clean + w * L_mix``.

    The module calls the two hooks: ``embed(encoder, x)`` for the clean embeddings (in feature
    mode the backbone runs once: ``encoder.forward_features`` then ``encoder.forward_head``, which
    timm encoders and ``models.TimmEncoder`` have), then ``forward(encoder, state, emb, labels,
    loss)`` for the mixed loss. Under DDP the mixing is per rank (local rows).

    Differences from the official code, on purpose: positive-negative mixes use every positive of
    the anchor (the code reuses the anchor's first positive for all of them); an anchor-negative
    step with no anchor lacking positives switches kind (the code crashes there).

    Args:
        mode: "input", "feature" or "embedding".
        w: weight of the mixed loss (paper: 0.4).
        alpha: ``lambda ~ Beta(alpha, alpha)`` (paper: 2).
        pairs: "alternate" (official: a random kind per step), "pos_neg" or "anchor_neg".
        negatives: the hardest negatives kept per anchor; ``None``: 1 in input mode, all otherwise
            (the official choices).
        miner: optional miner whose pairs are mixed; default all pairs.
        distance: ranks negatives by hardness; default ``LpDistance(normalize_embeddings=True)``.
    """

    MODES = ("input", "feature", "embedding")
    produces_mix = True  # read by the pre-flight check (experiments.preflight): the loss must accept_mix
    PAIRS = ("alternate", "pos_neg", "anchor_neg")
    ranking_only = True  # its distance only ranks negatives by hardness (losses.shared_distance)

    def __init__(
        self,
        mode: str = "feature",
        w: float = 0.4,
        alpha: float = 2.0,
        pairs: str = "alternate",
        negatives: int | None = None,
        miner: nn.Module | None = None,
        distance: BaseDistance | None = None,
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Metrix: mode={mode!r}; expected one of {self.MODES}")
        if pairs not in self.PAIRS:
            raise ValueError(f"Metrix: pairs={pairs!r}; expected one of {self.PAIRS}")
        if alpha <= 0 or w < 0:
            raise ValueError(f"Metrix: alpha={alpha}, w={w}; expected alpha > 0 and w >= 0")
        if negatives is not None and (int(negatives) != negatives or negatives < 1):
            raise ValueError(f"Metrix: negatives={negatives!r}; expected a positive integer or None (all)")
        self.mode, self.w, self.alpha, self.pairs = mode, float(w), float(alpha), pairs
        self.negatives = negatives if negatives is not None else (1 if mode == "input" else None)
        self.miner = miner
        self.distance_given = distance is not None
        self.distance = distance if distance is not None else LpDistance(normalize_embeddings=True)

    # ------------------------------------------------------------------------------- hooks
    def embed(self, encoder: nn.Module, x: Tensor) -> tuple[Tensor, Any]:
        """Clean embeddings ``[B, D]`` and what ``forward`` mixes later (features, images or nothing)."""
        if self.mode == "feature":
            for name in ("forward_features", "forward_head"):
                if not callable(getattr(encoder, name, None)):
                    raise TypeError(
                        f"Metrix(mode='feature') needs encoder.forward_features / forward_head (the timm API); "
                        f"{type(encoder).__name__} has no {name}. Use mode='embedding' or 'input', or a models.TimmEncoder"
                    )
            features = encoder.forward_features(x)
            return encoder.forward_head(features), features
        return encoder(x), (x if self.mode == "input" else None)

    def forward(
        self, encoder: nn.Module, state: Any, emb: Tensor, labels: Tensor | None, loss: nn.Module,
        *, pos_mask: Tensor | None = None, ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``w * L_mix`` with ``lambda ~ Beta(alpha, alpha)`` (0, with graph, if nothing to mix)."""
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        return self.mixed_loss(encoder, state, emb, labels, loss, lam, pos_mask=pos_mask, ignore_mask=ignore_mask)

    def mixed_loss(
        self, encoder: nn.Module, state: Any, emb: Tensor, labels: Tensor | None, loss: nn.Module, lam: float,
        *, pos_mask: Tensor | None = None, ignore_mask: Tensor | None = None,
    ) -> Tensor:
        """``w * L_mix`` for a given ``lambda``: ``emb: [B, D]`` clean embeddings, ``labels: [B]``, ``state`` from ``embed``.

        Relevance as masks: ``labels=None`` with ``pos_mask: [B, B]`` (and/or ``ignore_mask: [B, B]``),
        as for any loss; the soft labels are per-pair weights, so no class ids are needed (a loss over
        classes, ``ProxyAnchorLoss``, still needs labels).
        """
        if not getattr(loss, "accepts_mix", False):
            raise TypeError(
                f"Metrix needs a loss that takes a Mined.mix (accepts_mix = True: ContrastiveLoss, MultiSimilarityLoss, "
                f"ProxyAnchorLoss, NTXentLoss); got {type(loss).__name__}"
            )
        relevance = {k: v for k, v in (("pos_mask", pos_mask), ("ignore_mask", ignore_mask)) if v is not None}
        anchors, first, second = self.select(emb.detach(), labels, **relevance)
        if len(anchors) == 0 or self.w == 0:
            return emb.sum() * 0
        coeff = torch.full((len(anchors),), lam, dtype=torch.float64, device=emb.device)
        points = None
        if self.mode == "feature":
            points = encoder.forward_head(lam * state[first] + (1 - lam) * state[second])
        elif self.mode == "input":
            points = encoder(lam * state[first] + (1 - lam) * state[second])
        spec = MixSpec(
            anchors=anchors, first=first, second=second, coeff=coeff, pos_weight=coeff,
            first_source="query", second_source="query", normalize=False, detach=False, points=points,
        )
        return self.w * loss(emb, labels, Mined(mix=spec), **relevance)

    # --------------------------------------------------------------------------- pairs
    @torch.no_grad()
    def select(self, emb: Tensor, labels: Tensor | None, **relevance: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(anchors, first, second)`` row indices ``[M]`` of this step's mixes (``first`` is the positive or the anchor).

        ``relevance``: ``pos_mask`` / ``ignore_mask`` (``[B, B]`` bool), as for a miner.
        """
        if self.miner is not None:
            mined = self.miner(emb, labels, **relevance)
        else:
            mined = valid_pairs(resolve_inputs(emb, labels, who="Metrix", **relevance))
        if not isinstance(mined, Mined):
            mined = Mined.from_tuple(tuple(mined))
        a1, p, a2, n = mined.as_pairs()[:4]
        a2, n = self._hardest(emb, a2, n)
        has_pos = torch.zeros(len(emb), dtype=torch.bool, device=emb.device)
        has_pos[a1] = True
        lonely = ~has_pos[a2]  # negative pairs of anchors without a positive
        pos_neg = Mined.from_pairs(a1, p, a2, n).as_triplets()
        kinds = []
        if self.pairs in ("alternate", "pos_neg") and len(pos_neg.a):
            kinds.append("pos_neg")
        if self.pairs in ("alternate", "anchor_neg") and bool(lonely.any()):
            kinds.append("anchor_neg")
        if not kinds:
            empty = torch.empty(0, dtype=torch.long, device=emb.device)
            return empty, empty, empty
        kind = kinds[int(torch.randint(len(kinds), ()))]
        if kind == "pos_neg":
            return pos_neg.a, pos_neg.p, pos_neg.n
        return a2[lonely], a2[lonely], n[lonely]

    def _hardest(self, emb: Tensor, a2: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the ``negatives`` hardest negative pairs of each anchor (all when ``None``)."""
        if self.negatives is None or len(a2) == 0:
            return a2, n
        closeness = self.distance.pairwise(emb[a2], emb[n])
        if not self.distance.is_inverted:
            closeness = -closeness
        order = torch.argsort(closeness, descending=True, stable=True)
        order = order[torch.argsort(a2[order], stable=True)]
        sorted_anchor = a2[order]
        counts = torch.bincount(sorted_anchor, minlength=len(emb))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=a2.device) - starts[sorted_anchor]
        keep = order[rank < self.negatives]
        return a2[keep], n[keep]

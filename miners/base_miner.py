"""``BaseMiner``: the template every miner follows (validate -> ``mine()`` without gradient -> check)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from contracts.distances import BaseDistance, LpDistance
from contracts.inputs import Inputs, resolve_inputs
from contracts.mined import Mined


class BaseMiner(nn.Module):
    """A miner picks informative tuples from a batch; it never computes a loss.

    Subclasses implement ``mine(inputs) -> Mined`` only. ``forward`` validates the inputs, fills
    the reference set with the batch when none is given, runs ``mine`` under ``torch.no_grad`` on
    detached embeddings, and checks that every returned index is in range. The distance matrices
    ``mine`` computes with ``self.distance`` travel in ``Mined.matrices``, so that the loss can
    reuse them (``contracts.distances.BaseDistance.reusing``) instead of computing them again.

    Args:
        distance: the distance shared with the loss; ``default_distance()`` when omitted
            (``LpDistance(normalize_embeddings=True)``, as in pytorch-metric-learning).
            ``distance_given`` records which, so ``MetricLearningModule(distance=...)`` replaces defaults only.

    ``ranking_only``: True for a miner whose picks depend only on comparisons between entries of
    the distance matrix (no threshold, margin or sampling on its values): any distance that ranks
    pairs in the same order mines the same tuples (``losses.shared_distance``).
    """

    ranking_only: bool = False

    produces_mix: bool = False  # True: ``mine`` may return ``Mined.mix`` (the loss must set ``accepts_mix``)

    def __init__(self, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.distance_given = distance is not None
        self.distance = distance if distance is not None else self.default_distance()
        self.check_distance(self.distance)

    def check_distance(self, distance: BaseDistance) -> None:
        """Raise ``ValueError`` if this miner cannot work with ``distance`` (default: any distance works)."""

    def default_distance(self) -> BaseDistance:
        return LpDistance(normalize_embeddings=True)

    def forward(
        self,
        emb: Tensor,
        labels: Tensor | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        *,
        pos_mask: Tensor | None = None,
        ignore_mask: Tensor | None = None,
    ) -> Mined:
        """``emb: [B, D]``, ``labels: [B]``; optional reference set ``ref_emb: [M, D]``, ``ref_labels: [M]``.

        Instead of labels, ``pos_mask: [B, M]`` bool (``M = len(ref_emb)``, or ``B``) says which pairs
        are positive; ``ignore_mask: [B, M]`` bool (with either form) marks pairs that are neither
        positive nor negative (known false negatives). See ``contracts.inputs.resolve_inputs``.
        """
        inputs = resolve_inputs(
            emb, labels, ref_emb, ref_labels, who=type(self).__name__, pos_mask=pos_mask, ignore_mask=ignore_mask
        )
        with torch.no_grad(), self.distance.recording() as matrices:
            detached = inputs._replace(
                emb=inputs.emb.detach(),
                ref_emb=inputs.emb.detach() if inputs.same_set else inputs.ref_emb.detach(),
            )
            mined = self.mine(detached)
        if not isinstance(mined, Mined):
            raise TypeError(f"{type(self).__name__}.mine must return a Mined, got {type(mined).__name__}")
        mined.validate(len(inputs.emb), len(inputs.ref_emb))
        if matrices:
            mined = replace(mined, matrices=mined.matrices + tuple(matrices))
        return mined

    def mine(self, inputs: Inputs) -> Mined:
        raise NotImplementedError

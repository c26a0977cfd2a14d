"""``BaseLoss``: the template every loss follows (validate -> ``compute_loss()`` -> scalar)."""

from __future__ import annotations

from torch import Tensor, nn

from losses.distances import BaseDistance, LpDistance
from miners.mined import Mined
from miners.tuples import Inputs, resolve_inputs


class BaseLoss(nn.Module):
    """A loss over embeddings, optionally restricted to mined tuples.

    ``loss(emb, labels, mined=None, ref_emb=None, ref_labels=None)`` returns a scalar tensor.
    ``mined=None`` means every valid tuple; a ``Mined`` (or a pytorch-metric-learning indices
    tuple) restricts the loss to those tuples and supplies per-tuple weights. Subclasses implement
    ``compute_loss(inputs, mined)`` and convert ``mined`` with ``mined.as_pairs()`` /
    ``mined.as_triplets()``, so any miner feeds any loss.

    Args:
        distance: shared with the miner; ``default_distance()`` when omitted.
    """

    def __init__(self, distance: BaseDistance | None = None) -> None:
        super().__init__()
        self.distance = distance if distance is not None else self.default_distance()

    def default_distance(self) -> BaseDistance:
        return LpDistance(normalize_embeddings=True)

    def forward(
        self,
        emb: Tensor,
        labels: Tensor,
        mined: Mined | tuple | None = None,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
    ) -> Tensor:
        inputs = resolve_inputs(emb, labels, ref_emb, ref_labels, who=type(self).__name__)
        if mined is not None and not isinstance(mined, Mined):
            mined = Mined.from_tuple(tuple(mined))
        if mined is not None:
            mined.validate(len(inputs.emb), len(inputs.ref_emb))
        return self.compute_loss(inputs, mined)

    def compute_loss(self, inputs: Inputs, mined: Mined | None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def zero_loss(inputs: Inputs) -> Tensor:
        """A zero that keeps the graph, so ``backward()`` gives zero gradients rather than failing."""
        zero = inputs.emb.sum() * 0
        return zero if inputs.same_set else zero + inputs.ref_emb.sum() * 0

"""``MoCHiMiner``: every valid pair plus MoCHi's synthetic hard negatives, for InfoNCE against a memory."""

from __future__ import annotations

import dataclasses

from contracts.distances import BaseDistance
from contracts.inputs import Inputs
from contracts.mined import Mined
from contracts.relevance import pairs_of, relevance_masks
from miners.base_miner import BaseMiner
from miners.mochi import MoCHi


class MoCHiMiner(BaseMiner):
    """All positive and negative pairs, and ``MoCHi``'s synthetic negatives of every anchor as ``Mined.mix``.

    Kalantidis et al., "Hard Negative Mixing for Contrastive Learning" (NeurIPS 2020), with labels:
    the candidates of each anchor are the reference rows of another label (a supervised memory).
    Use it as the miner of ``CrossBatchMemory`` with a loss that accepts mixes (``NTXentLoss``):
    the memory is the queue, and the synthetic points (detached, never enqueued) become extra
    negatives in each anchor's denominator. Without a memory the reference set is the batch.

    Args:
        mochi: the mixer (``n_hard``, ``s``, ``s_prime``, warm-up); default ``MoCHi()``.
        distance: unused by the mixing (MoCHi is defined on cosine similarity); kept for the
            miner interface.
    """

    produces_mix = True  # read by the pre-flight check (experiments.preflight): the loss must accept_mix

    ranking_only = True  # ignores its distance altogether (losses.shared_distance)

    def __init__(self, mochi: MoCHi | None = None, distance: BaseDistance | None = None) -> None:
        super().__init__(distance=distance)
        self.mochi = mochi if mochi is not None else MoCHi()

    def mine(self, inputs: Inputs) -> Mined:
        pos, neg = relevance_masks(inputs)
        mined = pairs_of(pos, neg)
        spec = self.mochi.mix_spec(inputs.emb, inputs.ref_emb, candidates=neg)
        return dataclasses.replace(mined, mix=spec) if len(spec) else mined

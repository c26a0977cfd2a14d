"""The contracts miners and losses share, below both: neither imports the other, both import these.

- ``distances``: the one distance object a miner and a loss share (``LpDistance``, ``CosineSimilarity``).
- ``mined`` / ``mix_spec``: what a miner hands a loss (``Mined``; ``MixSpec`` for synthetic points).
- ``inputs``: the input checks every miner and loss runs first (``Inputs``, ``resolve_inputs``).
- ``relevance``: labels or ``pos_mask``/``ignore_mask`` become positive/negative masks (one place),
  and the "all valid tuples" sets.
- ``gather``: embeddings gathered across DDP ranks, with or without gradient.
- ``dtypes``: the dtype distances and losses compute in (``work_dtype``).

``from contracts import Mined, LpDistance``; ``losses`` and ``miners`` re-export the names their
users know (``from losses import CosineSimilarity``, ``from miners import Mined``).
"""

from contracts.dtypes import work_dtype
from contracts.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from contracts.mix_spec import MixSpec
from contracts.mined import Mined, Pairs, TripletMask, Triplets
from contracts.inputs import Inputs, resolve_inputs
from contracts.relevance import all_pairs, all_triplets, label_masks, relevance_masks, valid_pairs, valid_triplets
from contracts.gather import all_gather_no_grad, all_gather_with_grad

__all__ = [
    "work_dtype", "BaseDistance", "CosineSimilarity", "DotProductSimilarity", "LpDistance", "MixSpec", "Mined",
    "Pairs", "TripletMask", "Triplets", "Inputs", "resolve_inputs", "all_pairs", "all_triplets", "label_masks",
    "relevance_masks", "valid_pairs", "valid_triplets",
    "all_gather_no_grad", "all_gather_with_grad",
]

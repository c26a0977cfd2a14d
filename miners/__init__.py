"""Miners: pick informative tuples (and synthetic negatives) from a batch or a memory.

One class per file, named after the class. ``from miners import BatchHardMiner``.
"""

from contracts.mined import Mined, Pairs, TripletMask, Triplets
from contracts.mix_spec import MixSpec
from miners.base_miner import BaseMiner
from miners.batch_easy_hard_miner import BatchEasyHardMiner
from miners.batch_hard_miner import BatchHardMiner
from miners.distance_weighted_miner import DistanceWeightedMiner
from miners.guided_filter import GuidedFilter
from miners.hard_negative_top_k_miner import HardNegativeTopKMiner
from miners.memory import CrossBatchMemory
from miners.mine_hard_negatives import filter_candidates, mine_hard_negatives, select_negatives
from miners.mochi import MoCHi
from miners.mochi_miner import MoCHiMiner
from miners.multi_similarity_miner import MultiSimilarityMiner
from miners.negative_samplers import NegativeSampler, PositiveAwareFilter, SimANSSampler, TopKSampler, UniformSampler
from miners.pair_margin_miner import PairMarginMiner
from miners.triplet_margin_miner import TripletMarginMiner

__all__ = [
    "Mined", "MixSpec", "Pairs", "TripletMask", "Triplets", "BaseMiner", "BatchHardMiner",
    "BatchEasyHardMiner", "TripletMarginMiner", "MultiSimilarityMiner", "PairMarginMiner",
    "DistanceWeightedMiner", "HardNegativeTopKMiner", "CrossBatchMemory",
    "MoCHi", "MoCHiMiner", "mine_hard_negatives", "filter_candidates", "select_negatives", "GuidedFilter",
    "NegativeSampler", "PositiveAwareFilter", "SimANSSampler", "TopKSampler", "UniformSampler",
]

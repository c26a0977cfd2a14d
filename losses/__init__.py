"""Losses over embeddings, optionally restricted to mined tuples.

One class per file, named after the class. ``from losses import TripletMarginLoss``.
"""

from contracts.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from losses.reducers import (
    AvgNonZeroReducer, BaseReducer, DoNothingReducer, MeanReducer, MultipleReducers, PerAnchorReducer, SumReducer,
    ThresholdReducer,
)
from losses.shared_distance import DistanceMismatchWarning, check_distances, share_distance
from losses.base_loss import BaseLoss
from losses.triplet_margin_loss import TripletMarginLoss
from losses.contrastive_loss import ContrastiveLoss
from losses.multi_similarity_loss import MultiSimilarityLoss
from losses.ntxent_loss import NTXentLoss
from losses.sup_con_loss import SupConLoss
from losses.proxy_anchor_loss import ProxyAnchorLoss
from losses.circle_loss import CircleLoss
from losses.debiased_contrastive_loss import DebiasedContrastiveLoss
from losses.margin_loss import MarginLoss
from losses.metrix import Metrix
from losses.grad_cache import GradCache
from losses.clip_loss import CLIPLoss, SigLIPLoss
from losses.negclip_loss import NegCLIPLoss, TripletCLIPLoss
from losses.distillation import KLDistillationLoss, MarginMSELoss, candidate_scores

__all__ = [
    "BaseDistance", "CosineSimilarity", "DotProductSimilarity", "LpDistance", "BaseLoss", "TripletMarginLoss",
    "ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss", "ProxyAnchorLoss", "CircleLoss",
    "DebiasedContrastiveLoss", "MarginLoss", "BaseReducer", "MeanReducer", "SumReducer", "AvgNonZeroReducer",
    "ThresholdReducer", "PerAnchorReducer", "DoNothingReducer", "MultipleReducers", "DistanceMismatchWarning",
    "check_distances", "share_distance", "Metrix", "GradCache", "CLIPLoss", "SigLIPLoss", "NegCLIPLoss", "TripletCLIPLoss",
    "KLDistillationLoss",
    "MarginMSELoss",
    "candidate_scores",
]

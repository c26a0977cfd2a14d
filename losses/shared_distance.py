"""One distance for miner and loss: hand it to every component, or check that theirs agree.

pytorch-metric-learning's miners default to ``LpDistance`` and several of its losses to
``CosineSimilarity``, so ``BatchHardMiner`` + ``MultiSimilarityLoss`` silently mines with one
distance and trains with another (pytorch-metric-learning issue #548). Here a run configures the
distance once (``MetricLearningModule(distance=...)``, which calls ``share_distance``), and
``check_distances`` compares the components' distances when it does not. The rules:

- **Equal** distances (same class and settings: ``signature()`` and ``power``): fine; the loss also
  reuses the miner's matrix.
- **Same order**: a *ranking-only* miner (``ranking_only``: batch-hard, batch-easy-hard without
  value ranges, top-k without margin; Metrix's hardness ranking; MoCHiMiner) whose distance ranks
  every set of pairs in the order the loss's does (``same_order``: cosine and L2 on L2-normalised
  embeddings, or two powers of one Lp distance). It mines exactly the tuples the loss's distance
  would, so nothing is reported; the only cost is that the loss cannot reuse the miner's matrix.
- **Anything else** changes what is mined: thresholds, margins, epsilons and sampling densities
  are read in the miner's units, or the order itself differs. ``ValueError`` naming both, or a
  ``DistanceMismatchWarning`` when the run allows it on purpose (``allow_mismatch=True``).
"""

from __future__ import annotations

import warnings
from typing import Iterable

from torch import nn

from contracts.distances import BaseDistance, CosineSimilarity, DotProductSimilarity, LpDistance
from losses.base_loss import BaseLoss

FIX = (
    "configure one distance for both: MetricLearningModule(distance=...), on the command line "
    "--model.init_args.distance contracts.distances.CosineSimilarity (or LpDistance), or the same distance= "
    "to the miner and the loss; to keep both on purpose, --model.init_args.allow_distance_mismatch true"
)


class DistanceMismatchWarning(UserWarning):
    """A miner and a loss use distances that make them disagree on what is mined (allowed on purpose)."""


def describe(distance: BaseDistance) -> str:
    """``LpDistance(normalize_embeddings=True, p=2, power=1)``: the class and its settings."""
    return f"{type(distance).__name__}({distance.extra_repr()})"


def same_distance(a: BaseDistance, b: BaseDistance) -> bool:
    """Same class and settings: the two compute the same matrix."""
    return a.signature() == b.signature() and a.power == b.power


def order_key(distance: BaseDistance) -> tuple | None:
    """Distances with equal keys rank any set of pairs in the same (or exactly reversed, for a
    similarity against a distance) order: each is a strictly monotone function of the other.

    On L2-normalised embeddings ``|x - y|_2 = sqrt(2 - 2 cos(x, y))``, so cosine similarity and the
    normalised L2 distance (any power > 0) share a key. ``None``: no known equivalent but itself.
    """
    kind, power = type(distance), distance.power
    if kind is CosineSimilarity and power == 1:
        return ("unit-cosine",)
    if kind is LpDistance and power > 0:
        if distance.normalize_embeddings and distance.p == 2:
            return ("unit-cosine",)
        return ("lp", distance.normalize_embeddings, distance.p)
    if kind is DotProductSimilarity and power == 1:
        return ("dot",)
    return None


def same_order(a: BaseDistance, b: BaseDistance) -> bool:
    key = order_key(a)
    return same_distance(a, b) or (key is not None and key == order_key(b))


def holders(*components: nn.Module | None) -> list[nn.Module]:
    """Every module under ``components`` with a ``distance`` (miners, losses, memories' inner ones, Metrix)."""
    out: list[nn.Module] = []
    for component in components:
        if component is None:
            continue
        for module in component.modules():
            if isinstance(getattr(module, "distance", None), BaseDistance) and all(module is not m for m in out):
                out.append(module)
    return out


def is_loss(module: nn.Module) -> bool:
    return isinstance(module, BaseLoss)


def share_distance(distance: BaseDistance, components: Iterable[nn.Module | None], allow_mismatch: bool = False) -> None:
    """Give ``distance`` to every miner, loss and mixer under ``components`` that kept its default.

    A component given its own distance (``distance_given``) that differs from ``distance`` is an
    error (two distances configured for one run), unless ``allow_mismatch``: it then keeps its own
    and ``check_distances`` reports the disagreement. A component that cannot work with ``distance``
    (``check_distance``: circle loss, distance-weighted miner) raises its own error.
    """
    for module in holders(*components):
        if same_distance(module.distance, distance):
            module.distance = distance
            continue
        if getattr(module, "distance_given", False):
            if allow_mismatch:
                continue
            raise ValueError(
                f"two distances configured: the run's distance={describe(distance)} and "
                f"{type(module).__name__}(distance={describe(module.distance)}); give one (drop the "
                f"{type(module).__name__}'s, or set the run's to it), or --model.init_args.allow_distance_mismatch true"
            )
        check = getattr(module, "check_distance", None)
        if callable(check):
            check(distance)
        module.distance = distance


def check_distances(components: Iterable[nn.Module | None], allow_mismatch: bool = False) -> None:
    """Raise (or warn, ``allow_mismatch``) if a miner or mixer and the loss disagree on what is mined (rules above)."""
    found = holders(*components)
    losses = [m for m in found if is_loss(m)]
    if not losses:
        return
    loss = losses[0]
    for module in found:
        if module is loss:
            continue
        if same_distance(module.distance, loss.distance):
            continue
        if is_loss(module):
            problem = "the two losses compute with different distances"
        elif getattr(module, "ranking_only", False) and same_order(module.distance, loss.distance):
            continue  # the same tuples: a ranking-only miner sees the same order (module docstring)
        elif getattr(module, "ranking_only", False):
            problem = "the two distances rank pairs in different orders, so other tuples are picked"
        else:
            problem = "its thresholds, margins or sampling are read in other units than the loss's, so other tuples are picked"
        message = (
            f"{type(module).__name__} mines with {describe(module.distance)} but {type(loss).__name__} computes "
            f"with {describe(loss.distance)}: {problem} (pytorch-metric-learning issue #548). Fix: {FIX}"
        )
        if not allow_mismatch:
            raise ValueError(message)
        warnings.warn(message, DistanceMismatchWarning, stacklevel=3)

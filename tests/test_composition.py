"""Every miner x every loss (x with and without ``CrossBatchMemory``): the whole composition matrix.

Miners and losses are discovered from ``miners.__all__`` / ``losses.__all__``: a new class is
tested as soon as it is exported. Constructor arguments without a default come from ``REQUIRED``
(by parameter name). A loss declares ``supports_ref_emb = False`` when it cannot take a reference
set and ``accepts_mix = True`` once it uses a ``Mined.mix`` spec.

The pairings that cannot work are listed below by name, with the reason. Every other pairing must
run: a component that newly raises, or newly declares an incompatibility, fails the matrix instead
of being skipped; and a listed pairing that starts working fails too, so the list stays true.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest
import torch

import losses
import miners
from losses import BaseLoss, CosineSimilarity
from miners import BaseMiner, Mined

DIM, CLASSES = 8, 6
# Constructor arguments that have no default, by parameter name.
REQUIRED: dict[str, Any] = {"num_classes": CLASSES, "embedding_size": DIM}


# Losses that do not read the synthetic negatives of a ``Mined.mix`` spec (MoCHiMiner returns one).
NO_MIX = {"TripletMarginLoss", "SupConLoss", "CircleLoss", "DebiasedContrastiveLoss", "MarginLoss"}
# (miner, loss, setting) -> why that pairing cannot run; "*" matches every miner or loss.
INCOMPATIBLE: dict[tuple[str, str, str], str] = {
    ("DistanceWeightedMiner", "*", "shared_cosine"): "samples by the unit-sphere L2 distance density (Wu et al. 2017)",
    **{("MoCHiMiner", loss, setting): "ignores MoCHi's synthetic negatives" for loss in NO_MIX for setting in ("default_distances", "shared_cosine", "memory")},
    ("*", "ProxyAnchorLoss", "memory"): "compares embeddings with proxies, not with a reference set",
}


def expected_incompatible(miner_cls: type, loss_cls: type, setting: str) -> str | None:
    for m, l in ((miner_cls.__name__, loss_cls.__name__), (miner_cls.__name__, "*"), ("*", loss_cls.__name__)):
        if (m, l, setting) in INCOMPATIBLE:
            return INCOMPATIBLE[(m, l, setting)]
    return None


def exported(module, base: type) -> list[type]:
    out = []
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base and not inspect.isabstract(obj):
            out.append(obj)
    return out


MINERS = exported(miners, BaseMiner)
LOSSES = exported(losses, BaseLoss)
try:
    CrossBatchMemory = getattr(importlib.import_module("miners.memory"), "CrossBatchMemory", None)
except ImportError:
    CrossBatchMemory = None


def build(cls: type, **extra: Any):
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in extra.items() if k in params}
    for p in params.values():
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs:
            if p.name not in REQUIRED:
                pytest.fail(f"{cls.__name__} needs constructor argument {p.name!r}; add a value to REQUIRED in {__file__}")
            kwargs[p.name] = REQUIRED[p.name]
    return cls(**kwargs)


def pk_batch(seed: int, classes: int = 4, per_class: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return torch.randn(len(labels), DIM, generator=g), labels


def degenerate_batches() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(99)
    emb = torch.randn(CLASSES, DIM, generator=g)
    return [
        ("single", emb[:1], torch.zeros(1, dtype=torch.long)),
        ("all_distinct", emb, torch.arange(CLASSES)),
        ("one_class", emb, torch.zeros(CLASSES, dtype=torch.long)),
    ]


def check_step(loss_fn, miner, emb: torch.Tensor, labels: torch.Tensor, loss_module) -> torch.Tensor:
    """Mine, compute the loss, backpropagate; return the loss."""
    x = emb.clone().requires_grad_(True)
    mined = miner(x, labels)
    assert mined.mix is None or getattr(loss_module, "accepts_mix", False), (
        f"{type(loss_module).__name__} does not use the mixing spec that {type(miner).__name__} returns; "
        "list the pairing in INCOMPATIBLE or make the loss read it"
    )
    value = loss_fn(x, labels, mined)
    assert value.dim() == 0 and torch.isfinite(value), f"loss {value}"
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    if len(mined) == 0 and mined.mix is None:
        assert value.item() == 0.0
        assert torch.equal(x.grad, torch.zeros_like(x.grad))
    return value


@pytest.mark.parametrize("shared_distance", [False, True], ids=["default_distances", "shared_cosine"])
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("miner_cls", MINERS, ids=lambda c: c.__name__)
def test_miner_loss_matrix(miner_cls: type, loss_cls: type, shared_distance: bool) -> None:
    extra = {"distance": CosineSimilarity()} if shared_distance else {}
    reason = expected_incompatible(miner_cls, loss_cls, "shared_cosine" if shared_distance else "default_distances")
    if reason is not None:
        with pytest.raises((ValueError, AssertionError)):
            miner, loss = build(miner_cls, **extra), build(loss_cls, **extra)
            check_step(loss, miner, *pk_batch(0), loss)
        pytest.skip(f"expected: {miner_cls.__name__} + {loss_cls.__name__}: {reason}")
    miner, loss = build(miner_cls, **extra), build(loss_cls, **extra)
    torch.manual_seed(0)
    for seed in range(3):
        emb, labels = pk_batch(seed)
        check_step(loss, miner, emb, labels, loss)

    empty_seen = False
    for _, emb, labels in degenerate_batches():
        check_step(loss, miner, emb, labels, loss)
        empty_seen |= len(miner(emb, labels)) == 0
    assert empty_seen, "a single-sample batch must mine nothing"


@pytest.mark.skipif(CrossBatchMemory is None, reason="miners.memory.CrossBatchMemory does not exist yet")
@pytest.mark.parametrize("loss_cls", LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("miner_cls", MINERS, ids=lambda c: c.__name__)
def test_miner_loss_matrix_with_memory(miner_cls: type, loss_cls: type) -> None:
    loss, miner = build(loss_cls), build(miner_cls)
    reason = expected_incompatible(miner_cls, loss_cls, "memory")
    declared = not getattr(loss, "supports_ref_emb", True) or (miner(*pk_batch(0)).mix is not None and not getattr(loss, "accepts_mix", False))
    assert declared == (reason is not None), f"{miner_cls.__name__} + {loss_cls.__name__} in a memory: declared incompatible {declared}, listed {reason!r}"
    if reason is not None:
        pytest.skip(f"expected: {miner_cls.__name__} + {loss_cls.__name__} in a memory: {reason}")
    memory = CrossBatchMemory(loss, embedding_size=DIM, memory_size=40, miner=miner)

    # A fresh memory holding only the query's own copy: nothing to compare with, so the loss is 0.
    x = torch.randn(1, DIM, requires_grad=True)
    value = memory(x, torch.zeros(1, dtype=torch.long))
    value.backward()
    assert value.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x.grad))

    torch.manual_seed(0)
    for seed in range(4):  # 4 x 16 rows wrap the 40-row queue
        emb, labels = pk_batch(seed)
        x = emb.clone().requires_grad_(True)
        value = memory(x, labels)
        assert value.dim() == 0 and torch.isfinite(value)
        value.backward()
        assert torch.isfinite(x.grad).all()


def test_discovery_finds_the_components() -> None:
    assert miners.BatchHardMiner in MINERS
    assert {losses.TripletMarginLoss, losses.ContrastiveLoss, losses.NTXentLoss} <= set(LOSSES)
    assert all(isinstance(build(c), BaseLoss) for c in LOSSES)
    assert isinstance(Mined.from_triplets(*(torch.empty(0, dtype=torch.long),) * 3), Mined)

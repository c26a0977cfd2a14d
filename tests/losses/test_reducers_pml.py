"""Reducers by pytorch-metric-learning's names and semantics, against PML 2.9 (values and gradients, float64)."""

import pytest
import torch

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")

import losses as ours  # noqa: E402
import miners as our_miners  # noqa: E402

LOSSES = ["TripletMarginLoss", "ContrastiveLoss", "MultiSimilarityLoss", "NTXentLoss", "SupConLoss", "CircleLoss"]
#: (our reducer, PML's) factories; ThresholdReducer's high is set per case from the per-tuple losses
REDUCERS = {
    "mean": (ours.MeanReducer, pml_reducers.MeanReducer),
    "avg_non_zero": (ours.AvgNonZeroReducer, pml_reducers.AvgNonZeroReducer),
    "sum": (ours.SumReducer, pml_reducers.SumReducer),
    "threshold_low": (lambda: ours.ThresholdReducer(low=0.1), lambda: pml_reducers.ThresholdReducer(low=0.1)),
    "per_anchor": (ours.PerAnchorReducer, pml_reducers.PerAnchorReducer),
    "per_anchor_avg_non_zero": (
        lambda: ours.PerAnchorReducer(ours.AvgNonZeroReducer()),
        lambda: pml_reducers.PerAnchorReducer(pml_reducers.AvgNonZeroReducer()),
    ),
}


def batch(seed: int = 0, b: int = 24, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=g, dtype=torch.float64)
    labels = torch.arange(b) % 4
    return emb, labels


def mined_tuples(kind: str, emb, labels):
    if kind == "all":
        return None
    miner = pml_miners.BatchHardMiner() if kind == "batch_hard" else pml_miners.MultiSimilarityMiner(epsilon=0.1)
    return miner(emb, labels)


def value_and_grad(loss, emb, labels, indices):
    x = emb.clone().requires_grad_(True)
    out = loss(x, labels, indices)
    out.backward()
    return out.detach(), x.grad


def check(name, ours_reducer, pml_reducer, mined):
    emb, labels = batch()
    indices = mined_tuples(mined, emb, labels)
    ours_loss = getattr(ours, name)(reducer=ours_reducer)
    pml_loss = getattr(pml_losses, name)(reducer=pml_reducer)
    v1, g1 = value_and_grad(ours_loss, emb, labels, indices)
    v2, g2 = value_and_grad(pml_loss, emb, labels, indices)
    assert v1.item() != 0 or v2.item() == 0
    torch.testing.assert_close(v1, v2.to(v1.dtype), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mined", ["all", "batch_hard", "multi_similarity"])
@pytest.mark.parametrize("reducer", sorted(REDUCERS))
@pytest.mark.parametrize("name", LOSSES)
def test_reducer_matches_pml(name, reducer, mined):
    if reducer.startswith("per_anchor") and name == "TripletMarginLoss":
        pytest.skip("PerAnchorReducer refuses triplet losses, in PML as here (tested below)")
    ours_factory, pml_factory = REDUCERS[reducer]
    check(name, ours_factory(), pml_factory(), mined)


@pytest.mark.parametrize("name", LOSSES)
def test_threshold_band_and_do_nothing(name):
    """``ThresholdReducer(low, high)`` with ``high`` inside the spread of the per-tuple losses; the
    parts that ``DoNothingReducer`` returns are PML's (names, kinds, values)."""
    emb, labels = batch(1)
    parts = getattr(ours, name)(reducer=ours.DoNothingReducer())(emb, labels)
    theirs = getattr(pml_losses, name)(reducer=pml_reducers.DoNothingReducer())(emb, labels)
    assert set(parts) == set(theirs)
    for key, part in parts.items():
        assert part["reduction_type"] == theirs[key]["reduction_type"]
        torch.testing.assert_close(part["losses"].sort().values, theirs[key]["losses"].flatten().sort().values, rtol=1e-7, atol=1e-7)
    everything = torch.cat([p["losses"] for p in parts.values()])
    high = float(everything[everything > 0].median())
    check(name, ours.ThresholdReducer(low=0.01, high=high), pml_reducers.ThresholdReducer(low=0.01, high=high), "all")
    check(name, ours.ThresholdReducer(high=high), pml_reducers.ThresholdReducer(high=high), "all")


def test_per_anchor_refuses_triplets():
    emb, labels = batch()
    with pytest.raises(ValueError, match="not triplets"):
        ours.TripletMarginLoss(reducer=ours.PerAnchorReducer())(emb, labels)


def test_multiple_reducers_per_part():
    reducers = lambda lib: lib.MultipleReducers({"pos_loss": lib.MeanReducer()}, default_reducer=lib.AvgNonZeroReducer())  # noqa: E731
    check("ContrastiveLoss", reducers(ours), reducers(pml_reducers), "multi_similarity")


def test_default_equals_named_default():
    """``reducer=None`` (the fused path) equals the PML default reducer named in each docstring."""
    defaults = {
        "TripletMarginLoss": ours.AvgNonZeroReducer, "ContrastiveLoss": ours.AvgNonZeroReducer,
        "MultiSimilarityLoss": ours.MeanReducer, "NTXentLoss": ours.MeanReducer,
        "SupConLoss": ours.AvgNonZeroReducer, "CircleLoss": ours.AvgNonZeroReducer,
    }
    emb, labels = batch(2)
    for name, reducer in defaults.items():
        for miner in (None, our_miners.BatchHardMiner(), our_miners.MultiSimilarityMiner()):
            mined = None if miner is None else miner(emb, labels)
            v1, g1 = value_and_grad(getattr(ours, name)(), emb, labels, mined)
            v2, g2 = value_and_grad(getattr(ours, name)(reducer=reducer()), emb, labels, mined)
            torch.testing.assert_close(v1, v2, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-10)


def test_loss_without_tuple_losses_refuses_a_reducer():
    class FixedReduction(ours.BaseLoss):
        def compute_loss(self, inputs, mined):
            return inputs.emb.sum()

    with pytest.raises(ValueError, match="FixedReduction does not take a reducer"):
        FixedReduction(reducer=ours.MeanReducer())


def test_weights_multiply_before_reduction():
    """A weighted ``Mined`` with a reducer: each tuple's loss times its weight, then the reducer."""
    emb, labels = batch(3)
    a, p, n = our_miners.BatchHardMiner()(emb, labels)
    w = torch.linspace(0.1, 1.0, len(a), dtype=torch.float64)
    mined = our_miners.Mined.from_triplets(a, p, n, weights=w)
    loss = ours.TripletMarginLoss(margin=0.5, reducer=ours.MeanReducer())
    per = ours.TripletMarginLoss(margin=0.5, reducer=ours.DoNothingReducer())(emb, labels, (a, p, n))["loss"]["losses"]
    torch.testing.assert_close(loss(emb, labels, mined), (per * w).mean())

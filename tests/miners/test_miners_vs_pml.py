"""Every deterministic miner against pytorch-metric-learning 2.9: the same index sets on every batch.

Batches (see ``batches.py``): random, with exactly tied distances (copied rows, quantized
directions), with a one-sample class, with one class only or all-distinct labels (nothing
qualifies), with a separate reference set sharing rows with the queries. Embeddings are float64,
and our distances compute the matrix with the same kernels as PML's (``cdist``, ``matmul``), bit
for bit: rows tied in exact arithmetic are broken by the same rounding. For float16 and bfloat16
the selection logic is compared on the same half-precision matrix (PML gets ours through a distance
adaptor, because our ``LpDistance`` computes half inputs in float32 where PML stays in half), and
the two matrices are checked against each other to half precision.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import oracle

PM = oracle("pytorch_metric_learning.miners")
PD = oracle("pytorch_metric_learning.distances")

from losses import CosineSimilarity, DotProductSimilarity, LpDistance  # noqa: E402
from miners import (  # noqa: E402
    BatchEasyHardMiner,
    BatchHardMiner,
    Mined,
    MultiSimilarityMiner,
    PairMarginMiner,
    TripletMarginMiner,
)
from tests.miners.batches import as_sets, batches  # noqa: E402

DISTANCES = {
    "lp": (LpDistance, PD.LpDistance, {}),
    "lp_raw": (LpDistance, PD.LpDistance, {"normalize_embeddings": False}),
    "lp_squared": (LpDistance, PD.LpDistance, {"power": 2}),
    "cos": (CosineSimilarity, PD.CosineSimilarity, {}),
    "dot": (DotProductSimilarity, PD.DotProductSimilarity, {}),
}


def _pair(name: str):
    ours, theirs, kw = DISTANCES[name]
    if name == "dot":  # PML's DotProductSimilarity normalises by default; ours is the raw product
        return ours(), theirs(normalize_embeddings=False)
    return ours(**kw), theirs(**kw)


def _ranges(inverted: bool):
    return ((-0.3, 0.9), (-0.8, 0.6)) if inverted else ((0.2, 1.3), (0.5, 1.8))


EASY_HARD = [
    (p, n)
    for p in ("hard", "semihard", "easy", "all")
    for n in ("hard", "semihard", "easy", "all")
    if not (p == n == "semihard") and {p, n} != {"semihard", "all"}
]

# name -> builder(our_distance, pml_distance, inverted) -> (ours, pml)
MINERS = {
    "batch_hard": lambda d, pd, inv: (BatchHardMiner(distance=d), PM.BatchHardMiner(distance=pd)),
    **{
        f"easy_hard_{p}_{n}": (lambda p, n: lambda d, pd, inv: (
            BatchEasyHardMiner(pos_strategy=p, neg_strategy=n, distance=d),
            PM.BatchEasyHardMiner(pos_strategy=p, neg_strategy=n, distance=pd),
        ))(p, n)
        for p, n in EASY_HARD
    },
    **{
        f"easy_hard_ranges_{p}_{n}": (lambda p, n: lambda d, pd, inv: (
            BatchEasyHardMiner(p, n, *_ranges(inv), distance=d),
            PM.BatchEasyHardMiner(p, n, *_ranges(inv), distance=pd),
        ))(p, n)
        for p, n in [("hard", "hard"), ("easy", "semihard"), ("semihard", "easy"), ("all", "hard")]
    },
    **{
        f"triplet_{t}_{m}": (lambda t, m: lambda d, pd, inv: (
            TripletMarginMiner(margin=m, type_of_triplets=t, distance=d),
            PM.TripletMarginMiner(margin=m, type_of_triplets=t, distance=pd),
        ))(t, m)
        for t in ("all", "hard", "semihard", "easy")
        for m in (0.2, 0.0, 0.5)
    },
    **{
        f"multi_similarity_{e}": (lambda e: lambda d, pd, inv: (
            MultiSimilarityMiner(epsilon=e, distance=d),
            PM.MultiSimilarityMiner(epsilon=e, distance=pd),
        ))(e)
        for e in (0.1, 0.0, 0.4)
    },
    "pair_margin": lambda d, pd, inv: (
        PairMarginMiner(*((0.5, 0.3) if inv else (0.4, 1.2)), distance=d),
        PM.PairMarginMiner(*((0.5, 0.3) if inv else (0.4, 1.2)), distance=pd),
    ),
    "pair_margin_default": lambda d, pd, inv: (PairMarginMiner(distance=d), PM.PairMarginMiner(distance=pd)),
}


def _run_ours(miner, b, dtype=None):
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))
    out = miner(cast(b.emb), b.labels, cast(b.ref_emb), b.ref_labels)
    assert isinstance(out, Mined)
    return out.to_tuple()


def _run_pml(miner, b, dtype=None):
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else x.to(dtype))
    # distinct label objects, as a caller passing a separate reference set would
    ref_labels = None if b.ref_labels is None else b.ref_labels.clone()
    return miner(cast(b.emb), b.labels, cast(b.ref_emb), ref_labels)


def _check(ours_miner, pml_miner, dtype=None, seeds=(0, 1), expect_some=True):
    compared = nonempty = 0
    for seed in seeds:
        for b in batches(seed):
            ours = _run_ours(ours_miner, b, dtype)
            theirs = _run_pml(pml_miner, b, dtype)
            assert len(ours) == len(theirs), f"{b.name}: tuple form {len(ours)} vs PML {len(theirs)}"
            assert as_sets(ours) == as_sets(theirs), f"{b.name}: mined tuples differ from PML"
            compared += 1
            nonempty += any(len(t) for t in ours)
    assert compared >= 16 * len(seeds)
    if expect_some:  # the comparison saw real mining, not only empty outputs
        assert nonempty > 5 * len(seeds)


@pytest.mark.parametrize("miner", sorted(MINERS))
@pytest.mark.parametrize("dist", sorted(DISTANCES))
def test_equals_pml_float64(miner: str, dist: str) -> None:
    if "ranges" in miner and dist in ("lp_raw", "dot", "lp_squared"):
        pytest.skip("value ranges are written for unit-sphere distances")
    d, pd = _pair(dist)
    ours, theirs = MINERS[miner](d, pd, d.is_inverted)
    _check(ours, theirs, expect_some=miner != "triplet_semihard_0.0")  # 0 < m <= 0 is empty


class _Adaptor(PD.BaseDistance):
    """A PML distance that returns our miner's matrix, so PML's selection runs on identical values."""

    def __init__(self, ours):
        super().__init__(normalize_embeddings=ours.normalize_embeddings, p=ours.p, power=ours.power, is_inverted=ours.is_inverted)
        self.ours = ours

    def forward(self, query_emb, ref_emb=None):
        same = ref_emb is None or ref_emb is query_emb
        return self.ours(query_emb, None if same else ref_emb)


HALF_MINERS = ["batch_hard", "easy_hard_easy_semihard", "easy_hard_semihard_hard", "triplet_semihard_0.2",
               "triplet_all_0.2", "multi_similarity_0.1", "pair_margin"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("miner", HALF_MINERS)
@pytest.mark.parametrize("dist", ["lp", "cos"])
def test_equals_pml_half_precision(dtype: torch.dtype, miner: str, dist: str) -> None:
    d, _ = _pair(dist)
    ours, theirs = MINERS[miner](d, _Adaptor(d), d.is_inverted)
    _check(ours, theirs, dtype=dtype, seeds=(0,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dist", ["lp", "cos"])
def test_half_matrix_close_to_pml(dtype: torch.dtype, dist: str) -> None:
    d, pd = _pair(dist)
    for b in batches(3):
        ref = b.emb if b.ref_emb is None else b.ref_emb
        ours = d(b.emb.to(dtype), ref.to(dtype))
        exact = d(b.emb, ref)
        assert ours.dtype == dtype
        # values are at most 2 (unit sphere); near 0 a Euclidean distance amplifies input rounding to sqrt(eps)
        tol = 2 * torch.finfo(dtype).eps ** 0.5 if dist == "lp" else 8 * torch.finfo(dtype).eps
        assert (ours.double() - exact).abs().max() <= tol, b.name
        try:
            theirs = pd(b.emb.to(dtype), ref.to(dtype))
        except NotImplementedError:  # PML's cdist has no CPU bfloat16 kernel for > 25 rows
            continue
        assert (theirs.double() - exact).abs().max() <= tol, b.name


@pytest.mark.parametrize("dist", sorted(DISTANCES))
def test_distance_matrix_is_bitwise_pml(dist: str) -> None:
    """The premise of exact tie-breaking: our matrix and PML's are the same bits."""
    d, pd = _pair(dist)
    for b in batches(5):
        ref = b.emb if b.ref_emb is None else b.ref_emb
        assert torch.equal(d(b.emb, None if b.ref_emb is None else ref), pd(b.emb, ref)), b.name


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="pos_strategy"):
        BatchEasyHardMiner(pos_strategy="medium")
    with pytest.raises(ValueError, match="both be 'semihard'"):
        BatchEasyHardMiner("semihard", "semihard")
    with pytest.raises(ValueError, match="not 'all'"):
        BatchEasyHardMiner("all", "semihard")
    with pytest.raises(ValueError, match="type_of_triplets"):
        TripletMarginMiner(type_of_triplets="medium")


def test_triplet_miner_blocks_do_not_change_the_result() -> None:
    b = next(iter(batches(7)))
    whole = TripletMarginMiner(type_of_triplets="all")
    blocked = TripletMarginMiner(type_of_triplets="all")
    blocked.block_entries = 7  # one anchor per block
    assert as_sets(whole(b.emb, b.labels).to_tuple()) == as_sets(blocked(b.emb, b.labels).to_tuple())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("miner", HALF_MINERS)
def test_equals_pml_half_precision_cosine_direct(dtype: torch.dtype, miner: str) -> None:
    """With cosine similarity both libraries compute the half matrix with the same ops: no adaptor."""
    d, pd = _pair("cos")
    ours, theirs = MINERS[miner](d, pd, True)
    _check(ours, theirs, dtype=dtype, seeds=(0,))

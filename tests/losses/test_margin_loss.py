"""``MarginLoss`` against pytorch-metric-learning 2.9 (value and gradients, float64), a brute-force
loop over weighted triplets, and its edge cases (nothing mined, per-class beta, random triplets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import oracle, random_batch

P = oracle("pytorch_metric_learning.losses")
PM = oracle("pytorch_metric_learning.miners")
PD = oracle("pytorch_metric_learning.distances")
lmu = oracle("pytorch_metric_learning.utils.loss_and_miner_utils")

from contracts.inputs import resolve_inputs  # noqa: E402
from contracts.mined import Mined  # noqa: E402
from contracts.relevance import all_pairs  # noqa: E402
from losses import CosineSimilarity, LpDistance, MarginLoss  # noqa: E402
from miners import DistanceWeightedMiner  # noqa: E402

RTOL, ATOL = 1e-6, 1e-10
CLASSES = 4

# name -> (our kwargs, PML kwargs): the same hyper-parameters and distance.
CONFIGS = {
    "default": ({}, {}),
    "learn_beta": ({"learn_beta": True}, {"learn_beta": True}),
    "learn_beta_nu": ({"learn_beta": True, "nu": 0.3, "beta": 0.9}, {"learn_beta": True, "nu": 0.3, "beta": 0.9}),
    "per_class": (
        {"learn_beta": True, "nu": 0.1, "num_classes": CLASSES},
        {"learn_beta": True, "nu": 0.1, "num_classes": CLASSES},
    ),
    "per_class_fixed": ({"num_classes": CLASSES, "beta": 0.8, "nu": 0.5}, {"num_classes": CLASSES, "beta": 0.8, "nu": 0.5}),
    "one_class_beta": ({"learn_beta": True, "nu": 0.2, "num_classes": 1}, {"learn_beta": True, "nu": 0.2, "num_classes": 1}),
    "cosine": (
        {"margin": 0.1, "beta": 0.3, "learn_beta": True, "distance": CosineSimilarity()},
        {"margin": 0.1, "beta": 0.3, "learn_beta": True, "distance": PD.CosineSimilarity()},
    ),
    "unnormalized": (
        {"margin": 0.5, "beta": 3.0, "distance": LpDistance(normalize_embeddings=False)},
        {"margin": 0.5, "beta": 3.0, "distance": PD.LpDistance(normalize_embeddings=False)},
    ),
}


def our_distance_weighted(emb, labels, ref_emb=None, ref_labels=None):
    torch.manual_seed(0)
    return DistanceWeightedMiner()(emb, labels, ref_emb, ref_labels).to_tuple()


MINERS = {
    "all": None,
    "pair_margin": lambda: PM.PairMarginMiner(pos_margin=0.3, neg_margin=0.9),
    "multi_similarity": lambda: PM.MultiSimilarityMiner(epsilon=0.1),
    "triplet_semihard": lambda: PM.TripletMarginMiner(margin=0.3, type_of_triplets="semihard"),
    "triplet_all": lambda: PM.TripletMarginMiner(margin=0.3, type_of_triplets="all"),
    "batch_hard": lambda: PM.BatchHardMiner(),
    "distance_weighted": lambda: our_distance_weighted,
}


def make_pair(name: str) -> tuple[MarginLoss, torch.nn.Module]:
    """Ours and PML's, both with a float64 beta (PML's float32 beta would accumulate its gradient in float32)."""
    ours_kwargs, pml_kwargs = CONFIGS[name]
    ours, pml = MarginLoss(**ours_kwargs).double(), P.MarginLoss(**pml_kwargs)
    beta = pml.beta.detach().double()
    pml.beta = torch.nn.Parameter(beta) if pml.learn_beta else beta
    return ours, pml


def make_batch(seed: int, n: int = 12, dim: int = 6, ref: int | None = None):
    return random_batch(seed, n, dim, CLASSES, ref)


def loss_and_grads(loss_fn, emb, labels, ref_emb, ref_labels, mined):
    """The loss and its gradients wrt ``emb``, ``ref_emb`` (if any) and ``beta`` (if learnable)."""
    leaves = [emb.clone().requires_grad_(True)]
    if ref_emb is not None:
        leaves.append(ref_emb.clone().requires_grad_(True))
    if isinstance(loss_fn.beta, torch.nn.Parameter):
        leaves.append(loss_fn.beta)
    kwargs = {} if ref_emb is None else {"ref_emb": leaves[1], "ref_labels": ref_labels}
    loss = loss_fn(leaves[0], labels, mined, **kwargs)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g.reshape(x.shape) for x, g in zip(leaves, grads)]


def assert_matches_pml(name, emb, labels, ref_emb=None, ref_labels=None, indices=None) -> None:
    ours, pml = make_pair(name)
    mined = None if indices is None else Mined.from_tuple(indices)
    value, grads = loss_and_grads(ours, emb, labels, ref_emb, ref_labels, mined)
    ref_value, ref_grads = loss_and_grads(pml, emb, labels, ref_emb, ref_labels, indices)
    torch.testing.assert_close(value, ref_value.reshape(()).to(value.dtype), rtol=RTOL, atol=ATOL)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg.reshape(g.shape), rtol=RTOL, atol=ATOL)


def mine(name, emb, labels, ref_emb, ref_labels):
    if MINERS[name] is None:
        return None
    miner = MINERS[name]()
    return miner(emb, labels) if ref_emb is None else miner(emb, labels, ref_emb, ref_labels)


# ------------------------------------------------------------------------------- vs PML
@pytest.mark.parametrize("with_ref", [False, True], ids=["same_set", "ref_set"])
@pytest.mark.parametrize("miner_name", list(MINERS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_pml_on_random_batches(config: str, miner_name: str, with_ref: bool) -> None:
    for seed in range(3):
        emb, labels, ref_emb, ref_labels = make_batch(seed, ref=9 if with_ref else None)
        indices = mine(miner_name, emb, labels, ref_emb, ref_labels)
        assert_matches_pml(config, emb, labels, ref_emb, ref_labels, indices)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ties_in_distance(config: str) -> None:
    """Embeddings on a coarse grid with duplicated rows: many exactly tied distances, hinges at 0."""
    g = torch.Generator().manual_seed(7)
    grid = torch.randint(-1, 2, (6, 4), generator=g).to(torch.float64)
    grid[grid.abs().sum(dim=1) == 0, 0] = 1.0
    emb = grid[torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 2, 3])]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 1, 2, 2, 0, 0, 1])
    for miner in (None, PM.TripletMarginMiner(margin=0.3, type_of_triplets="all"), PM.PairMarginMiner(0.5, 0.5)):
        indices = None if miner is None else miner(emb, labels)
        assert_matches_pml(config, emb, labels, indices=indices)


@pytest.mark.parametrize(
    "labels",
    [
        [0, 0, 0, 1, 1, 2, 2, 2, 3],  # class 3 has a single sample
        [2, 2, 2, 2, 2, 2],  # no negatives
        [0, 1, 2, 3, 0, 1],  # every class twice
        [0, 1, 2, 3],  # no positives
        [0, 0, 1, 2, 3],  # one positive pair
    ],
    ids=["singleton_class", "one_class", "pairs_only", "all_distinct", "one_positive_pair"],
)
@pytest.mark.parametrize("config", ["default", "learn_beta_nu", "per_class"])
def test_label_edge_cases(config: str, labels: list[int]) -> None:
    labels_t = torch.tensor(labels)
    emb = torch.randn(len(labels), 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_matches_pml(config, emb, labels_t)


@pytest.mark.parametrize("config", ["learn_beta_nu", "per_class"])
def test_triplets_without_any_loss(config: str) -> None:
    """Classes far apart: triplets exist but every hinge is 0 (PML still adds nu * beta for one shared beta)."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    emb = torch.zeros(6, 3, dtype=torch.float64)
    emb[:3, 0], emb[3:, 1] = 1.0, 1.0
    emb[:, 2] = torch.tensor([0.0, 1e-3, -1e-3, 0.0, 2e-3, -2e-3])
    ours, _ = make_pair(config)
    value = ours(emb, labels)
    expected = 0.3 * ours.beta.item() if config == "learn_beta_nu" else 0.0
    assert value.item() == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert_matches_pml(config, emb, labels)


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("config", ["default", "learn_beta_nu", "per_class"])
def test_nothing_mined_gives_zero_loss_and_zero_gradients(config: str) -> None:
    ours, _ = make_pair(config)
    emb, labels, ref_emb, ref_labels = make_batch(1, ref=5)
    empty = torch.empty(0, dtype=torch.long)
    positives_only = Mined.from_pairs(torch.tensor([0]), torch.tensor([1]), empty, empty)
    zero_weights = Mined.from_triplets(torch.tensor([0]), torch.tensor([1]), torch.tensor([2]), torch.zeros(1))
    for mined in (Mined.from_pairs(empty, empty, empty, empty), Mined.from_triplets(empty, empty, empty), positives_only, zero_weights):
        for ref in (None, ref_emb):
            value, grads = loss_and_grads(ours, emb, labels, ref, None if ref is None else ref_labels, mined)
            assert value.item() == 0.0
            for g in grads:
                assert torch.equal(g, torch.zeros_like(g))


def test_pairs_equal_their_triplet_join() -> None:
    """Mined pairs stand for ``Mined.as_triplets()``'s join, weights multiplied, without listing it."""
    loss = MarginLoss(learn_beta=True, nu=0.2, num_classes=CLASSES).double()
    for seed in range(3):
        emb, labels, ref_emb, ref_labels = make_batch(seed, ref=10)
        g = torch.Generator().manual_seed(seed)
        a1, p, a2, n, _, _ = all_pairs(labels, ref_labels, False).as_pairs()
        pw, nw = torch.rand(len(a1), generator=g, dtype=torch.float64), torch.rand(len(a2), generator=g, dtype=torch.float64)
        pw[::4], nw[::5] = 0.0, 0.0
        pairs = Mined.from_pairs(a1, p, a2, n, pw, nw)
        triplets = Mined.from_triplets(*pairs.as_triplets())
        got = loss_and_grads(loss, emb, labels, ref_emb, ref_labels, pairs)
        want = loss_and_grads(loss, emb, labels, ref_emb, ref_labels, triplets)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def brute_force(emb, labels, triplets, weights, margin, beta, nu, per_class):
    """The docstring formula, one triplet at a time (same-set batch, normalised L2 distance)."""
    x = F.normalize(emb, dim=1)
    total, count, reg = emb.sum() * 0, 0, emb.sum() * 0
    for (a, p, n), w in zip(triplets, weights):
        if w == 0:
            continue
        b = beta[labels[a]] if per_class else beta
        lp = F.relu(torch.dist(x[a], x[p]) - b + margin)
        ln = F.relu(b - torch.dist(x[a], x[n]) + margin)
        total = total + w * (lp + ln)
        count += int(lp > 0) + int(ln > 0)
        reg = reg + w * nu * b
    if not per_class:
        reg = nu * beta if any(w > 0 for w in weights) else reg
        return (total / count if count else total) + reg
    return (total + reg) / count if count else total


@pytest.mark.parametrize("per_class", [False, True], ids=["shared_beta", "per_class_beta"])
@pytest.mark.parametrize("form", ["triplets", "pairs"])
def test_weights_match_brute_force(form: str, per_class: bool) -> None:
    kwargs = {"margin": 0.3, "nu": 0.4, "beta": 1.1, "learn_beta": True, "num_classes": CLASSES if per_class else None}
    for seed in range(3):
        emb, labels, _, _ = make_batch(seed, n=9)
        g = torch.Generator().manual_seed(seed)
        a1, p, a2, n, _, _ = all_pairs(labels, labels, True).as_pairs()
        keep_p, keep_n = torch.rand(len(a1), generator=g) < 0.7, torch.rand(len(a2), generator=g) < 0.5
        a1, p, a2, n = a1[keep_p], p[keep_p], a2[keep_n], n[keep_n]
        a1, p = torch.cat([a1, a1[:1]]), torch.cat([p, p[:1]])  # a repeated pair counts twice
        pw = torch.rand(len(a1), generator=g, dtype=torch.float64) * 2
        nw = torch.rand(len(a2), generator=g, dtype=torch.float64) * 2
        pw[1], nw[2] = 0.0, 0.0
        if form == "pairs":
            mined = Mined.from_pairs(a1, p, a2, n, pw, nw)
            listed = [
                ((int(a1[i]), int(p[i]), int(n[j])), float(pw[i] * nw[j]))
                for i in range(len(a1))
                for j in range(len(a2))
                if a1[i] == a2[j]
            ]
        else:
            ta, tp, tn, _ = Mined.from_pairs(a1, p, a2, n).as_triplets()
            tw = torch.rand(len(ta), generator=g, dtype=torch.float64) * 2
            tw[::7] = 0.0
            mined = Mined.from_triplets(ta, tp, tn, tw)
            listed = [((int(ta[i]), int(tp[i]), int(tn[i])), float(tw[i])) for i in range(len(ta))]
        ours = MarginLoss(**kwargs).double()
        got, got_grads = loss_and_grads(ours, emb, labels, None, None, mined)

        x = emb.clone().requires_grad_(True)
        beta = torch.nn.Parameter(ours.beta.detach().clone())
        want = brute_force(x, labels, [t for t, _ in listed], [w for _, w in listed], 0.3, beta, 0.4, per_class)
        want_grads = torch.autograd.grad(want, [x, beta])
        torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-12)
        for gg, wg in zip(got_grads, want_grads):
            torch.testing.assert_close(gg, wg, rtol=1e-9, atol=1e-12)


def test_unit_weights_equal_pml_and_zero_weight_is_absent() -> None:
    emb, labels, _, _ = make_batch(4)
    a, p, n = PM.TripletMarginMiner(margin=0.3, type_of_triplets="all")(emb, labels)
    ours, pml = make_pair("per_class")
    ones = Mined.from_triplets(a, p, n, torch.ones(len(a), dtype=torch.float64))
    torch.testing.assert_close(ours(emb, labels, ones), pml(emb, labels, (a, p, n)), rtol=RTOL, atol=ATOL)
    w = torch.ones(len(a), dtype=torch.float64)
    w[::3] = 0.0
    keep = w > 0
    dropped = ours(emb, labels, Mined.from_triplets(a, p, n, w))
    torch.testing.assert_close(dropped, pml(emb, labels, (a[keep], p[keep], n[keep])), rtol=RTOL, atol=ATOL)


def test_negative_weights_are_rejected() -> None:
    emb, labels, _, _ = make_batch(0)
    a, p, n, _ = all_pairs(labels, labels, True).as_triplets()
    with pytest.raises(ValueError, match=">= 0"):
        MarginLoss()(emb, labels, Mined.from_triplets(a, p, n, -torch.ones(len(a))))


# ------------------------------------------------------------------------------ beta
def test_beta_is_a_parameter_only_when_learned() -> None:
    shared, per_class, fixed = MarginLoss(learn_beta=True), MarginLoss(learn_beta=True, num_classes=7), MarginLoss(num_classes=7)
    assert isinstance(shared.beta, torch.nn.Parameter) and shared.beta.shape == ()
    assert isinstance(per_class.beta, torch.nn.Parameter) and per_class.beta.shape == (7,)
    assert [id(x) for x in per_class.parameters()] == [id(per_class.beta)]
    assert list(fixed.parameters()) == [] and fixed.beta.shape == (7,) and "beta" in fixed.state_dict()
    assert torch.equal(per_class.beta.detach(), torch.full((7,), 1.2))


def test_learned_beta_moves_under_sgd() -> None:
    loss = MarginLoss(learn_beta=True, nu=0.1, num_classes=CLASSES)
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.5)
    emb, labels, _, _ = make_batch(2)
    before = loss.beta.detach().clone()
    loss(emb.float(), labels).backward()
    optimizer.step()
    present = torch.zeros(CLASSES, dtype=torch.bool)
    present[labels.unique()] = True
    assert not torch.equal(loss.beta.detach()[present], before[present])


def test_labels_outside_the_classes_are_rejected() -> None:
    emb, labels, _, _ = make_batch(0)
    loss = MarginLoss(num_classes=3)
    too_large = labels.clamp(max=2)
    too_large[0] = 3
    with pytest.raises(ValueError, match=r"num_classes=3"):
        loss(emb, too_large)
    with pytest.raises(ValueError, match=r"num_classes=3"):
        loss(emb, labels - 1)
    MarginLoss(num_classes=1)(emb, labels)  # one shared beta: any labels, as in PML


@pytest.mark.parametrize(
    "kwargs", [{"triplets_per_anchor": 0}, {"triplets_per_anchor": "some"}, {"triplets_per_anchor": True}, {"num_classes": 0}]
)
def test_bad_arguments_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        MarginLoss(**kwargs)


# --------------------------------------------------------------------- random triplets
@pytest.mark.parametrize("with_ref", [False, True], ids=["same_set", "ref_set"])
def test_random_triplets_are_valid_and_cover_pmls_anchors(with_ref: bool) -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])  # class 2 has no positive in the batch
    ref_labels = torch.tensor([0, 1, 1, 3, 4, 4]) if with_ref else None
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(len(labels), 4, generator=g, dtype=torch.float64)
    ref_emb = torch.randn(6, 4, generator=g, dtype=torch.float64) if with_ref else None
    loss = MarginLoss(triplets_per_anchor=5)
    inputs = resolve_inputs(emb, labels, ref_emb, ref_labels)
    a, p, n, _ = loss._random_triplets(inputs).as_triplets()
    ref = inputs.ref_labels
    assert bool((labels[a] == ref[p]).all()) and bool((labels[a] != ref[n]).all())
    if not with_ref:
        assert bool((a != p).all())
    pa, _, _ = lmu.get_random_triplet_indices(labels, ref_labels, t_per_anchor=5)
    assert torch.equal(torch.bincount(a, minlength=len(labels)), torch.bincount(pa, minlength=len(labels)))


def test_random_triplets_give_pmls_loss_on_the_same_draw() -> None:
    emb, labels, _, _ = make_batch(5)
    ours, pml = make_pair("per_class")
    ours.triplets_per_anchor = 3
    torch.manual_seed(11)
    drawn = ours._random_triplets(resolve_inputs(emb, labels)).to_tuple()
    torch.manual_seed(11)
    value, grads = loss_and_grads(ours, emb, labels, None, None, None)
    ref_value, ref_grads = loss_and_grads(pml, emb, labels, None, None, drawn)
    torch.testing.assert_close(value, ref_value.reshape(()), rtol=RTOL, atol=ATOL)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg.reshape(g.shape), rtol=RTOL, atol=ATOL)


def test_random_triplets_follow_pmls_distribution() -> None:
    """Over many draws, the mean loss and the (anchor, positive) frequencies agree with PML's sampler."""
    emb, labels, _, _ = make_batch(6, n=10)
    ours, pml = MarginLoss(triplets_per_anchor=4).double(), P.MarginLoss(triplets_per_anchor=4)
    torch.manual_seed(0)
    draws = 300
    mine_values = torch.stack([ours(emb, labels) for _ in range(draws)])
    pml_values = torch.stack([pml(emb, labels) for _ in range(draws)])
    spread = (mine_values.var() / draws + pml_values.var() / draws).sqrt()
    assert abs(float(mine_values.mean() - pml_values.mean())) < 4 * float(spread) + 1e-12

    inputs = resolve_inputs(emb, labels)
    counts = torch.zeros(len(labels), len(labels))
    for _ in range(draws):
        a, p, _, _ = ours._random_triplets(inputs).as_triplets()
        counts.index_put_((a, p), torch.ones(len(a)), accumulate=True)
    pos = (labels[:, None] == labels[None]) & ~torch.eye(len(labels), dtype=torch.bool)
    rows = pos.any(dim=1)
    expected = (4 * draws / pos.sum(dim=1, keepdim=True).clamp(min=1)).expand_as(counts)
    assert bool((counts[~pos] == 0).all())
    # each frequency is Binomial(4 * draws, 1 / n_pos): within 5 standard deviations
    sd = (expected * (1 - 1 / pos.sum(dim=1, keepdim=True).clamp(min=1))).sqrt()
    assert bool(((counts - expected).abs()[pos & rows[:, None]] <= 5 * sd[pos & rows[:, None]] + 1e-9).all())


# ------------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", ["default", "per_class"])
def test_half_precision_close_to_float32(config: str, dtype: torch.dtype) -> None:
    emb, labels, _, _ = make_batch(8, n=16, dim=8)
    rounded = emb.to(dtype)
    for miner in (None, PM.TripletMarginMiner(margin=0.3, type_of_triplets="all")):
        indices = None if miner is None else miner(rounded.float(), labels)
        mined = None if indices is None else Mined.from_tuple(indices)
        loss = MarginLoss(**CONFIGS[config][0])
        full = loss(rounded.float(), labels, mined)
        x = rounded.clone().requires_grad_(True)
        half = loss(x, labels, mined)
        half.backward()
        assert half.dtype == dtype and torch.isfinite(x.grad).all()
        assert abs(half.float().item() - full.item()) <= 0.02 * abs(full.item()) + 0.01, (half.item(), full.item())

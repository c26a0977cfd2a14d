"""The composition matrix in the text regime: every miner x every loss on ``DualEncoderModule``'s step.

``tests/test_composition.py`` runs every miner with every loss on labelled embeddings; this file
runs the same components (discovered by its helpers, so a newly exported class is tested here too)
where relevance is by document ids: a query -> document batch of ``TinyQueryDoc`` (queries, their
paired documents and ``k`` hard negatives, ``pos_idx`` listing every relevant document), two
``CharBagEncoder`` towers, and the module's own training step (``embed`` then ``run_step``: what
``training_step`` runs, without the Trainer's logging; one Trainer fit checks that path too).

Three settings:

- ``plain``: queries against ``[every document of the batch; every hard negative]``;
- ``memory``: ``memory_size > 0``, a queue of past documents with their ids (``CrossBatchMemory``):
  after two steps the queue holds the first batch's documents, and a queued document that is a
  positive of a current query (by id) is its positive, never a negative;
- ``mochi``: the queue plus the ``MoCHi`` mixer (Kalantidis et al., "Hard Negative Mixing for
  Contrastive Learning", NeurIPS 2020, Sec. 4): synthetic negatives mixed from each query's hardest
  queue entries, for the losses that accept mixes.

The module's one ``distance`` is each loss's own default, shared with the miner (so a margin miner
and its loss agree). Two-view losses (``losses.CLIPLoss`` and kin: InfoNCE over the pairs, the
text regime's usual objective; ``losses.SigLIPLoss`` with the module's ``logit_bias``, ``MODULE_KWARGS``)
join the matrix; they score every pair themselves and take no miner.

A pairing runs with a finite loss and finite gradients that reach both towers, and with relevance
equal to a brute-force reading of the ids; or it is listed in ``TEXT_INCOMPATIBLE`` (or in
``tests.test_composition.INCOMPATIBLE``) with the reason, and then it must fail: a listed pairing
that starts working fails the matrix, so the list stays true.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import lightning as L
import pytest
import torch

import losses
from lightning_modules.dual_encoder_module import DualEncoderModule, tokens
from losses import CosineSimilarity, LpDistance
from miners import MoCHi, MoCHiMiner
from tests.datamodules.test_query_doc import TinyQueryDoc, char_tokenizer
from tests.helpers import cpu_trainer, quiet, sgd
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder
from tests.test_composition import LOSSES, MINERS, build, expected_incompatible

SETTINGS = ("plain", "memory", "mochi")
TWO_VIEW = [getattr(losses, n) for n in losses.__all__ if isinstance(getattr(losses, n), type) and getattr(getattr(losses, n), "two_view", False)]
ALL_LOSSES = LOSSES + TWO_VIEW
MEMORY_SIZE = 16
# Queries of the second batch (rows 4..7) list a document of the first batch (rows 0..3) among their
# positives: the queue then holds known positives of the current queries.
TRAIN_QRELS = [[0], [1], [2], [3], [0, 4], [1, 5], [2, 6], [3, 7]]

# Miner settings for this batch (two fresh towers: query/document cosine ~0.2-0.45, L2 ~1.05-1.25):
# the defaults of PairMarginMiner (made for trained unit-sphere embeddings) keep no negative here.
MINER_KWARGS: dict[tuple[str, str], dict[str, Any]] = {
    ("PairMarginMiner", "LpDistance"): {"pos_margin": 0.2, "neg_margin": 1.2},
    ("PairMarginMiner", "CosineSimilarity"): {"pos_margin": 0.8, "neg_margin": 0.3},
}
SMALL_MOCHI = {"n_hard": 4, "s": 4, "s_prime": 2}
# Module settings a loss needs: SigLIP's learnable bias b of Eq. 1, at the paper's initialisation (t' = log 10, b = -10)
MODULE_KWARGS: dict[str, dict[str, Any]] = {"SigLIPLoss": {"temperature": 0.1, "logit_bias": -10.0, "learn_temperature": True}}

NO_MINER = "no miner"
_TWO_VIEW_NAMES = {c.__name__ for c in TWO_VIEW}
TAKES_NO_MINER = "a two-view loss scores every pair itself; EmbeddingStep refuses a miner"
# (miner, loss, setting) -> why that pairing cannot run in the text regime; "*" matches any miner or
# setting. Besides these: a miner with a two-view loss (TAKES_NO_MINER), a loss without accepts_mix in
# the "mochi" setting, and the reasons of tests.test_composition.INCOMPATIBLE (``expected_reason``).
TEXT_INCOMPATIBLE: dict[tuple[str, str, str], str] = {
    ("*", "ProxyAnchorLoss", "*"): "needs class labels (one proxy per class); query -> document relevance is by document ids",
    **{(NO_MINER, name, "mochi"): "a two-view loss takes no Mined, so it cannot read MoCHi's synthetic negatives (the step refuses the pair)" for name in _TWO_VIEW_NAMES},
}


def distance_name(loss_cls: type) -> str | None:
    distance = getattr(build(loss_cls), "distance", None)
    return None if distance is None else type(distance).__name__


def expected_reason(miner_cls: type | None, loss_cls: type, setting: str) -> str | None:
    """Why ``miner_cls`` + ``loss_cls`` cannot run in ``setting``, or None."""
    miner, loss = NO_MINER if miner_cls is None else miner_cls.__name__, loss_cls.__name__
    for key in ((miner, loss, setting), (miner, loss, "*"), ("*", loss, setting), ("*", loss, "*")):
        if key in TEXT_INCOMPATIBLE:
            return TEXT_INCOMPATIBLE[key]
    if miner_cls is not None and loss in _TWO_VIEW_NAMES:
        return TAKES_NO_MINER
    if setting == "mochi" and not getattr(loss_cls, "accepts_mix", False):
        return "ignores MoCHi's synthetic negatives (accepts_mix = False)"
    if miner_cls is None:
        return None
    # the labelled matrix's reasons: the miner shares the loss's distance, as in its distance settings
    cosine = distance_name(loss_cls) == "CosineSimilarity"
    reason = expected_incompatible(miner_cls, loss_cls, "shared_cosine" if cosine else "default_distances")
    if reason is None and setting != "plain":
        reason = expected_incompatible(miner_cls, loss_cls, "memory")
    return reason


# ------------------------------------------------------------------------------------ the batches
def query_doc_batches() -> tuple[dict[str, Any], dict[str, Any]]:
    """Two train batches (query rows 0..3, then 4..7) tokenized by the DataModule's own collate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = TinyQueryDoc(batch_size=4, num_negatives=2, num_workers=0, seed=3, train_qrels=TRAIN_QRELS,
                          data_config={"tokenizer": char_tokenizer, "max_length": 48})
        dm.setup("fit")
    return tuple(dm.collate_fn([dm.train_dataset[(row, 0)] for row in rows]) for rows in (range(4), range(4, 8)))


BATCHES = query_doc_batches()


def make_module(miner_cls: type | None, loss_cls: type, setting: str) -> DualEncoderModule:
    loss = build(loss_cls)
    distance = getattr(loss, "distance", None)
    miner = None
    if miner_cls is not None:
        kwargs = dict(MINER_KWARGS.get((miner_cls.__name__, type(distance).__name__), {}))
        miner = build(miner_cls, mochi=MoCHi(**SMALL_MOCHI), **kwargs)
    return DualEncoderModule(
        CharBagEncoder(0), loss, doc_encoder=CharBagEncoder(1), miner=miner, memory_size=0 if setting == "plain" else MEMORY_SIZE,
        mixer=MoCHi(**SMALL_MOCHI) if setting == "mochi" else None, distance=None if distance is None else copy.deepcopy(distance), optimizer=sgd,
        **MODULE_KWARGS.get(loss_cls.__name__, {}),
    )


def train_step(module: DualEncoderModule, batch: dict[str, Any]) -> dict[str, Any]:
    """What ``training_step`` runs (embed -> shared step), then backward, from zero gradients."""
    module.zero_grad(set_to_none=True)
    out = module.run_step(module.embed(batch))
    out["loss"].backward()
    return out


def brute_relevance(batch: dict[str, Any], memory_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, M + B + B k]`` positives and ignored pairs of the batch's queries against ``[queue; documents;
    hard negatives]``, by reading the ids one pair at a time."""
    ref_ids = memory_ids + batch["doc_idx"].tolist() + batch["neg_idx"].reshape(-1).tolist()
    rows = [[i for i in row if i >= 0] for row in batch["pos_idx"].tolist()]
    pos = torch.tensor([[r >= 0 and r in row for r in ref_ids] for row in rows])
    ign = torch.tensor([[r < 0 for r in ref_ids] for _ in rows])
    return pos, ign


def run_combination(miner_cls: type | None, loss_cls: type, setting: str) -> dict[str, Any]:
    """Build, step (twice with a queue) and check everything a working pairing must satisfy."""
    torch.manual_seed(0)
    module = make_module(miner_cls, loss_cls, setting)
    first, second = BATCHES
    memory_ids: list[int] = []
    if setting != "plain":
        train_step(module, first)
        mem_emb, mem_ids = module.step.memory.filled()
        assert mem_ids.tolist() == first["doc_idx"].tolist(), "the queue holds the first batch's documents, by id"
        with torch.no_grad():
            torch.testing.assert_close(mem_emb, module.documents(tokens(first, "doc_")))
        memory_ids = mem_ids.tolist()
    out = train_step(module, second if setting != "plain" else first)
    batch = second if setting != "plain" else first

    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]), f"loss {out['loss']}"
    for tower in (module.query_encoder, module.doc_encoder):
        grads = [p.grad for p in tower.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), "a tower has no or non-finite gradients"
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches the {'query' if tower is module.query_encoder else 'document'} tower"

    pos, ign = brute_relevance(batch, memory_ids)
    assert torch.equal(out["pos_mask"].cpu(), pos) and torch.equal(out["ignore_mask"].cpu(), ign), "relevance differs from the ids"
    if setting != "plain":
        assert pos[:, : len(memory_ids)].any(), "the test needs a queued document that is a positive of a current query"
    mined = out["mined"]
    if mined is not None:
        a1, p, a2, n, _, _ = mined.as_pairs()
        assert pos[a1, p].all(), "a mined positive pair is not relevant by id"
        assert not (pos[a2, n] | ign[a2, n]).any(), "a positive (or an empty slot) was mined as a negative"
    if setting == "mochi":
        assert mined is not None and mined.mix is not None and len(mined.mix) > 0, "MoCHi's synthetic negatives did not reach the loss"
    return out


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("loss_cls", ALL_LOSSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("miner_cls", [None, *MINERS], ids=lambda c: NO_MINER.replace(" ", "_") if c is None else c.__name__)
def test_text_regime_matrix(miner_cls: type | None, loss_cls: type, setting: str) -> None:
    reason = expected_reason(miner_cls, loss_cls, setting)
    if reason is not None:
        with pytest.raises((ValueError, AssertionError)):
            run_combination(miner_cls, loss_cls, setting)
        pytest.skip(f"expected: {NO_MINER if miner_cls is None else miner_cls.__name__} + {loss_cls.__name__} ({setting}): {reason}")
    run_combination(miner_cls, loss_cls, setting)


def mixed_reference_rows(spec, n_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(anchor, reference column)`` of every queue row a ``MixSpec`` mixes into a synthetic negative."""
    anchors, cols = [], []
    for which in ("first", "second"):
        idx, source = getattr(spec, which), getattr(spec, f"{which}_source")
        if source == "ref":
            keep = torch.ones_like(idx, dtype=torch.bool)
            col = idx
        elif source == "both":  # cat([queries, references]): query rows first
            keep, col = idx >= n_queries, idx - n_queries
        else:
            continue
        anchors.append(spec.anchors[keep])
        cols.append(col[keep])
    return torch.cat(anchors), torch.cat(cols)


@pytest.mark.parametrize("loss_cls", [losses.NTXentLoss, losses.ContrastiveLoss], ids=lambda c: c.__name__)
def test_mochi_never_mixes_a_positive_of_the_query(loss_cls: type) -> None:
    out = run_combination(None, loss_cls, "mochi")
    anchors, cols = mixed_reference_rows(out["mined"].mix, len(out["emb"]))
    assert len(cols) > 0
    assert not (out["pos_mask"][anchors, cols] | out["ignore_mask"][anchors, cols]).any(), "MoCHi mixed a positive into a synthetic negative"


def test_mochi_miner_mixes_only_negatives() -> None:
    """``MoCHiMiner`` (the miner form) reads the relevance masks: its mixes are negatives of their anchor, queue included."""
    out = run_combination(MoCHiMiner, losses.NTXentLoss, "memory")
    anchors, cols = mixed_reference_rows(out["mined"].mix, len(out["emb"]))
    assert len(cols) > 0 and out["pos_mask"][:, : len(BATCHES[0]["doc_idx"])].any()  # queued positives exist, and are never mixed
    assert not (out["pos_mask"][anchors, cols] | out["ignore_mask"][anchors, cols]).any()


class KeepDocIds(L.Callback):
    def __init__(self) -> None:
        self.doc_ids: list[int] = []
        self.mixed: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.doc_ids += batch["doc_idx"].tolist()
        mined = outputs["mined"]
        self.mixed.append(0 if mined is None or mined.mix is None else len(mined.mix))


def test_a_trainer_fit_runs_the_queue_and_the_mixer() -> None:
    """The same step through a real ``L.Trainer`` fit of two steps: the queue then holds both batches'
    documents (by id), MoCHi mixes from the second step on (the queue is empty at the first), the towers train."""
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(0), losses.NTXentLoss(), doc_encoder=CharBagEncoder(1), memory_size=MEMORY_SIZE,
                               mixer=MoCHi(**SMALL_MOCHI), optimizer=sgd)
    dm = TinyQueryDoc(batch_size=4, num_negatives=2, num_workers=0, seed=3, train_qrels=TRAIN_QRELS)
    before = [p.detach().clone() for p in module.doc_encoder.parameters()]
    keep = KeepDocIds()
    quiet(cpu_trainer(max_steps=2, limit_val_batches=0, callbacks=[keep]).fit, module, datamodule=dm)
    _, ids = module.step.memory.filled()
    assert len(keep.doc_ids) == 8 and sorted(ids.tolist()) == sorted(keep.doc_ids)
    assert keep.mixed[0] == 0 and keep.mixed[1] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, module.doc_encoder.parameters()))


def test_the_matrix_covers_every_component() -> None:
    assert {losses.CLIPLoss, losses.SigLIPLoss, losses.NTXentLoss, losses.TripletMarginLoss} <= set(ALL_LOSSES)
    assert len(MINERS) >= 8 and all(distance_name(c) in (None, "CosineSimilarity", "LpDistance") for c in ALL_LOSSES)
    assert isinstance(CosineSimilarity(), type(build(losses.NTXentLoss).distance)) and isinstance(build(losses.TripletMarginLoss).distance, LpDistance)

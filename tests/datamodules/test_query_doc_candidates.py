"""The query/document DataModule's pluggable negative sampler and replaceable candidate store: a new
version reaches DataLoader workers (none, persistent or not) at the next epoch, draws stay deterministic
across worker counts, positives are never negatives, partial updates merge, bad input names the problem."""

import os
import warnings

import numpy as np
import pytest

from miners.negative_samplers import PositiveAwareFilter, SimANSSampler, TopKSampler
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, items_by_query, tiny, usable

N_Q, N_D = len(TRAIN_Q), len(CORPUS)


def new_rows(seed=0, width=6):
    """Candidate rows per train query (positives and -1 slots included on purpose) and their scores."""
    g = np.random.default_rng(seed)
    rows = np.stack([g.permutation(N_D)[:width] for _ in range(N_Q)]).astype(np.int64)
    rows[2, 4:] = -1
    scores = -np.sort(-g.uniform(0, 1, size=rows.shape), axis=1).astype(np.float32)
    return rows, scores, g.uniform(0.3, 0.9, size=N_Q).astype(np.float32)


def usable_new(rows, q):
    out = []
    for c in rows[q].tolist():
        if c >= 0 and c not in TRAIN_QRELS[q] and c not in out:
            out.append(c)
    return out


def loader_items(dm, epoch, **loader):
    dm.num_workers = loader.get("num_workers", 0)
    dm.persistent_workers = loader.get("persistent_workers", False)
    return items_by_query(dm.train_dataloader(), epoch)


@pytest.mark.parametrize("workers,persistent", [(0, False), (2, False), (2, True)], ids=["main", "workers", "persistent"])
def test_a_new_version_reaches_the_workers_at_the_next_epoch(workers, persistent):
    dm = tiny(num_negatives=2, batch_size=4, num_workers=workers, persistent_workers=persistent)
    loader = dm.train_dataloader()
    first = items_by_query(loader, 0)
    assert all(set(negs) <= set(usable(q)) | {-1} for q, (_, negs) in first.items())  # the static candidates
    rows, scores, pos = new_rows()
    assert dm.set_candidates(rows, scores, pos) == 1 and dm.candidate_store.version == 1
    second = items_by_query(loader, 1)  # the same loader: persistent workers keep their dataset copy
    for q, (doc, negs) in second.items():
        assert doc in TRAIN_QRELS[q]
        allowed = usable_new(rows, q)
        assert set(negs) - {-1} <= set(allowed) and len([n for n in negs if n >= 0]) == min(2, len(allowed))
    reference = tiny(num_negatives=2, batch_size=4)
    reference.set_candidates(rows, scores, pos)
    assert second == items_by_query(reference.train_dataloader(), 1)  # any worker count: the same draws


def test_samplers_plug_in_and_use_the_stored_scores():
    rows, scores, pos = new_rows(1)
    dm = tiny(num_negatives=2, batch_size=4, negative_sampler=TopKSampler())
    dm.set_candidates(rows, scores, pos)
    for q, (_, negs) in items_by_query(dm.train_dataloader(), 0).items():
        assert list(negs) == (usable_new(rows, q)[:2] + [-1, -1])[:2]
    # TopK-PercPos over the live scores, then the top: the first survivors of s <= 0.95 s_pos
    dm = tiny(num_negatives=2, batch_size=4, negative_sampler=PositiveAwareFilter(TopKSampler(), relative_margin=0.05))
    dm.set_candidates(rows, scores, pos)
    for q, (_, negs) in items_by_query(dm.train_dataloader(), 3).items():
        kept, seen = [], set(TRAIN_QRELS[q])
        for c, s in zip(rows[q].tolist(), scores[q].tolist()):
            if c >= 0 and c not in seen:
                seen.add(c)
                if s <= pos[q] - abs(pos[q]) * 0.05:
                    kept.append(c)
        assert list(negs) == (kept[:2] + [-1, -1])[:2]


def test_a_scored_sampler_on_static_candidates_is_a_clear_error():
    dm = tiny(num_negatives=2, batch_size=4, negative_sampler=SimANSSampler())
    with pytest.raises(ValueError, match="ANNRefresh"):
        next(iter(dm.train_dataloader()))


def test_partial_updates_keep_the_other_queries_candidates_and_versions_are_pruned():
    dm = tiny(num_negatives=2, batch_size=4)
    rows, scores, pos = new_rows(2)
    dm.set_candidates(rows[[1, 5]], scores[[1, 5]], pos[[1, 5]], query_rows=[1, 5])
    stored = dm.candidate_store.load(1)
    for q in range(N_Q):
        got = [c for c in stored["rows"][q].tolist() if c >= 0]
        if q in (1, 5):
            assert got == [c for c in rows[q].tolist() if c >= 0]
            assert np.allclose(stored["scores"][q][: len(got)], scores[q][: len(got)]) and stored["pos_scores"][q] == pos[q]
        else:  # the static list of that query, unscored
            assert got == usable(q) and np.isnan(stored["scores"][q]).all() and np.isnan(stored["pos_scores"][q])
    for _ in range(3):
        dm.set_candidates(rows, scores, pos)
    versions = sorted(d for d in os.listdir(dm.candidate_store.directory) if d.startswith("v"))
    assert versions == ["v000003", "v000004"]  # the last two are kept


def test_dynamic_candidates_need_no_static_ones_and_pad_until_the_first_refresh():
    with pytest.raises(ValueError, match="dynamic_candidates=True"):
        tiny(num_negatives=2, with_negatives=False)
    dm = tiny(num_negatives=2, batch_size=4, with_negatives=False, dynamic_candidates=True)
    assert all(negs == (-1, -1) for _, negs in items_by_query(dm.train_dataloader(), 0).values())
    rows, scores, pos = new_rows(3)
    dm.set_candidates(rows, scores, pos)
    assert any(n >= 0 for _, negs in items_by_query(dm.train_dataloader(), 1).values() for n in negs)


def test_candidate_dir_holds_one_folder_per_rank(tmp_path):
    dm = tiny(num_negatives=1, candidate_dir=str(tmp_path / "cands"))
    dm.set_candidates(*new_rows())
    assert (tmp_path / "cands" / "rank0" / "v000001" / "rows.npy").is_file()


def test_bad_candidates_name_the_problem():
    dm = tiny(num_negatives=1)
    rows, scores, pos = new_rows()
    with pytest.raises(ValueError, match=r"rows must be \[Q, C\]"):
        dm.set_candidates(rows[0])
    with pytest.raises(ValueError, match="7 lists for 8 train queries"):
        dm.set_candidates(rows[:7])
    bad = rows.copy()
    bad[3, 1] = N_D
    with pytest.raises(ValueError, match=rf"rows\[3, 1\] = {N_D} is outside the corpus of {N_D}"):
        dm.set_candidates(bad)
    with pytest.raises(ValueError, match="scores has shape"):
        dm.set_candidates(rows, scores[:, :2])
    with pytest.raises(ValueError, match="pos_scores has shape"):
        dm.set_candidates(rows, scores, pos[:3])
    with pytest.raises(ValueError, match="query_rows must be"):
        dm.set_candidates(rows[:2], query_rows=[0, N_Q])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileNotFoundError, match="version 5 is not in"):
            dm.set_candidates(rows)
            dm.train_dataset[(0, 0, 5)]

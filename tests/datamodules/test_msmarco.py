"""MS MARCO passage: the lazy collection, the file readers and ``MSMARCOPassageDataModule`` on miniature files.

The real files cannot be downloaded here; ``make_msmarco`` writes each official file in its official
format (tab-separated TSV, TREC qrels, the sentence-transformers and Tevatron JSONL) with a few
dozen passages, and returns the ground truth it wrote, which the tests compare the readers with.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.id_lists import IdLists
from datamodules.metadata import DatasetFormatError
from datamodules.msmarco import MSMARCOPassageDataModule, text_id
from datamodules.msmarco_files import (
    read_qidpidtriples,
    read_qrels,
    read_queries,
    read_st_hard_negatives,
    read_tevatron,
    read_text_triples,
)
from datamodules.text_collection import CACHE_SUFFIX, LazyTextCollection

N_PASSAGES = 40
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]


def passage(pid: int) -> str:
    rng = random.Random(pid)
    return f"passage {pid} " + " ".join(rng.choice(WORDS) for _ in range(6 + pid % 5)) + " caf\u00e9"


def write(path: Path, lines: list[str], gz: bool = False) -> Path:
    text = "".join(line + "\n" for line in lines)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make_msmarco(root: Path) -> dict:
    """The MS MARCO passage files in ``root``; returns what was written (qid -> pids, texts)."""
    root.mkdir(parents=True, exist_ok=True)
    write(root / "collection.tsv", [f"{pid}\t{passage(pid)}" for pid in range(N_PASSAGES)])
    # train queries in a non-sorted qid order; qids 121 and 163 have no qrels; 128 has two positives
    train_qids = [142, 100, 121, 107, 135, 128, 114, 163, 149, 156]
    write(root / "queries.train.tsv", [f"{q}\twhat is query {q}" for q in train_qids])
    train_qrels = {100: [3], 107: [5], 114: [7], 128: [9, 11], 135: [13], 142: [15], 149: [17], 156: [19]}
    lines = [f"{q}\t0\t{p}\t1" for q, ps in train_qrels.items() for p in ps]
    lines.append("163\t0\t21\t0")  # relevance 0: not a positive
    write(root / "qrels.train.tsv", lines)
    dev_qids = [9, 2, 5]
    write(root / "queries.dev.small.tsv", [f"{q}\tdev question {q}" for q in dev_qids])
    dev_qrels = {9: [30], 2: [31, 32], 5: [33]}
    write(root / "qrels.dev.small.tsv", [f"{q} 0 {p} 1" for q, ps in dev_qrels.items() for p in ps])  # space separated
    # qidpidtriples: BM25-style negatives; 128 repeats its list for both positives; 142's list holds its positive 15
    negatives = {q: [(q * 3 + j) % N_PASSAGES for j in range(5)] for q in train_qrels}
    negatives[142] = [15, 1, 2, 3]
    negatives[156] = [4]  # fewer than k = 2
    lines = [f"{q}\t{p}\t{n}" for q, ps in train_qrels.items() for p in ps for n in negatives[q]]
    lines.append("999\t1\t2")  # a qid outside the train queries
    write(root / "qidpidtriples.train.full.2.tsv", lines)
    write(root / "triples.train.small.tsv", [f"what is query {q}\t{passage(train_qrels[q][0])}\t{passage(negatives[q][-1])}" for q in train_qrels])
    st = {q: {"bm25": negatives[q][:3], "tasb": [negatives[q][-1], 38, 39]} for q in train_qrels}
    write(root / "msmarco-hard-negatives.jsonl.gz",
          [json.dumps({"qid": q, "pos": train_qrels[q], "neg": st[q]}) for q in train_qrels], gz=True)
    tev = {q: [(q + j) % N_PASSAGES for j in range(3)] for q in train_qrels}
    write(root / "train.jsonl.gz", [json.dumps({
        "query_id": str(q), "query": f"what is query {q}",
        "positive_passages": [{"docid": str(p), "title": "-", "text": passage(p)} for p in train_qrels[q]],
        "negative_passages": [{"docid": str(n), "title": "-", "text": passage(n)} for n in tev[q]]}) for q in train_qrels], gz=True)
    return {"train_qids": train_qids, "train_qrels": train_qrels, "dev_qids": dev_qids, "dev_qrels": dev_qrels,
            "negatives": negatives, "st": st, "tevatron": tev}


def unique(xs):
    return list(dict.fromkeys(xs))


@pytest.fixture(scope="module")
def marco(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("msmarco")
    return root, make_msmarco(root)


def simple_tokenizer(texts, max_length=16):
    """Word ids by a fixed hash, padded: enough to check shapes and that the right texts arrive."""
    rows = [[1 + sum(map(ord, w)) % 997 for w in t.split()][:max_length] or [1] for t in texts]
    width = max(len(r) for r in rows)
    return {"input_ids": [r + [0] * (width - len(r)) for r in rows], "attention_mask": [[1] * len(r) + [0] * (width - len(r)) for r in rows]}


def datamodule(root: Path, **kwargs) -> MSMARCOPassageDataModule:
    kwargs.setdefault("batch_size", 4)
    return MSMARCOPassageDataModule(str(root), data_config={"tokenizer": simple_tokenizer, "max_length": 16}, num_workers=0,
                                    eval_batch_size=8, **kwargs)


# ---------------------------------------------------------------------------------- collection
def test_collection_reads_texts_ids_and_rows(tmp_path):
    path = write(tmp_path / "c.tsv", ["10\thello world", "3\tsecond\tpassage", "7\tthird\r"])
    c = LazyTextCollection(path)
    assert len(c) == 3 and list(c) == ["hello world", "second\tpassage", "third"]
    assert c.ids.tolist() == [10, 3, 7] and c.ids.dtype == np.int64
    assert c.row_of([7, 10, 3]).tolist() == [2, 0, 1] and c.row_of(3) == 1
    assert c[-1] == "third" and c[0:2] == ["hello world", "second\tpassage"]
    with pytest.raises(IndexError):
        c[3]
    with pytest.raises(KeyError, match=r"id 99 is not in .*c\.tsv \(2 of the 3 ids"):
        c.row_of([3, 99, 100])


def test_collection_consecutive_ids_and_last_line_without_newline(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"5\ta\n6\tb\n7\tc")
    c = LazyTextCollection(path)
    assert list(c) == ["a", "b", "c"] and c.order is None
    assert c.row_of(np.array([[7, 5]])).tolist() == [[2, 0]]
    with pytest.raises(KeyError, match="id 8 is not in"):
        c.row_of([8])


def test_collection_row_of_matches_a_dict_on_random_ids(tmp_path):
    rng = np.random.default_rng(0)
    ids = rng.choice(10**12, size=500, replace=False)
    path = write(tmp_path / "c.tsv", [f"{i}\ttext {i}" for i in ids])
    c = LazyTextCollection(path)
    lookup = {int(i): r for r, i in enumerate(ids)}
    probe = rng.choice(ids, size=200)
    assert c.row_of(probe).tolist() == [lookup[int(i)] for i in probe]
    assert all(c[lookup[int(i)]] == f"text {i}" for i in probe[:20])


@pytest.mark.parametrize("line, message", [
    ("12 no tab here", r"line 2: expected 2 tab-separated fields"),
    ("", r"line 2: expected 2 tab-separated fields .* got an empty line"),
    ("\ttext", r"line 2: expected an integer id in column 0, got an empty id"),
    ("x1\ttext", r"line 2: expected an integer id in column 0, got the id 'x1'"),
    ("0\tagain", r"line 2: id 0 repeats line 1"),
])
def test_collection_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.tsv"
    path.write_text(f"0\tfirst\n{line}\n2\tthird\n")
    with pytest.raises(DatasetFormatError, match=f"{path}.*{message}" if "repeats" not in message else message) as err:
        LazyTextCollection(path)
    assert str(path) in str(err.value)


def test_collection_cache_reused_then_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write(tmp_path / "c.tsv", ["1\tone", "2\ttwo"])
    built = []
    original = LazyTextCollection.build_index

    def counting(self):
        built.append(self.path)
        return original(self)

    monkeypatch.setattr(LazyTextCollection, "build_index", counting)
    first = LazyTextCollection(path)
    assert len(built) == 1 and (tmp_path / ("c.tsv" + CACHE_SUFFIX)).is_file() and first.index_source.startswith("built")
    second = LazyTextCollection(path)
    assert len(built) == 1 and second.index_source.startswith("cache") and list(second) == ["one", "two"]
    write(path, ["1\tone", "2\ttwo", "3\tthree"])
    third = LazyTextCollection(path)
    assert len(built) == 2 and list(third) == ["one", "two", "three"]
    # same size, new mtime: rebuilt too
    size = path.stat().st_size
    path.write_text("1\tONE\n2\tTWO\n3\tTHREE\n")
    os.utime(path, ns=(1, 1))
    assert path.stat().st_size == size
    assert list(LazyTextCollection(path)) == ["ONE", "TWO", "THREE"] and len(built) == 3
    # a cache of another column choice is not reused
    LazyTextCollection(path, id_column=None, text_column=1)
    assert len(built) == 4


def test_collection_read_only_folder_falls_back_to_cache_dir(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        # root writes anywhere: simulate the read-only folder by failing the temp file beside the data
        import tempfile as tf

        real = tf.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if Path(dir) == tmp_path / "data":
                raise PermissionError(13, "Permission denied", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr("datamodules.text_collection.tempfile.mkstemp", mkstemp)
    data = tmp_path / "data"
    data.mkdir()
    path = write(data / "c.tsv", ["1\tone", "2\ttwo"])
    data.chmod(0o555)
    monkeypatch.setenv("HARDNEG_CACHE", str(tmp_path / "cache"))
    try:
        with pytest.warns(UserWarning, match="is not writable"):
            c = LazyTextCollection(path)
        assert not (data / ("c.tsv" + CACHE_SUFFIX)).exists()
        assert str(tmp_path / "cache") in c.index_source
        assert LazyTextCollection(path).index_source.startswith(f"cache {tmp_path / 'cache'}")
    finally:
        data.chmod(0o755)


def _read_rows(item):
    return item


class ReadWithPid(torch.utils.data.Dataset):
    def __init__(self, collection):
        self.collection = collection

    def __len__(self):
        return len(self.collection)

    def __getitem__(self, i):
        text = self.collection[i]
        return text, os.getpid(), self.collection._pid


def test_collection_reads_from_two_dataloader_workers(tmp_path):
    path = write(tmp_path / "c.tsv", [f"{i}\t{passage(i)}" for i in range(64)])
    c = LazyTextCollection(path)
    c[0]  # the parent opens its descriptor first: each forked worker must open its own
    loader = DataLoader(ReadWithPid(c), batch_size=8, num_workers=2, collate_fn=_read_rows)
    got = [item for batch in loader for item in batch]
    assert [t for t, _, _ in got] == [passage(i) for i in range(64)]
    pids = {pid for _, pid, _ in got}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all(owner == pid for _, pid, owner in got)  # every worker read through a descriptor it opened


def test_index_and_int_table_across_block_boundaries(tmp_path, monkeypatch):
    """Tiny read blocks put line breaks, tabs and ids across block edges; compare with a line-by-line parse."""
    import datamodules.text_collection as tc
    from datamodules import msmarco_files

    rng = random.Random(1)
    ids = rng.sample(range(-50, 10**15), 300)
    lines = [f"{i}\t{passage(abs(i) % 97)}" + ("\r" if j % 7 == 0 else "") for j, i in enumerate(ids)]
    path = write(tmp_path / "c.tsv", lines)
    monkeypatch.setattr(tc, "BLOCK_BYTES", 13)
    c = LazyTextCollection(path)
    assert c.ids.tolist() == ids and len(c) == len(lines)
    assert list(c) == [line.split("\t", 1)[1].rstrip("\r") for line in lines]
    data = path.read_bytes()
    assert c.offsets.tolist() == [0] + [k + 1 for k, b in enumerate(data) if b == 10]
    rows = [(rng.randrange(10**6), rng.randrange(10**7), rng.randrange(10**7)) for _ in range(200)]
    table = write(tmp_path / "t.tsv", ["\t".join(map(str, r)) for r in rows])
    monkeypatch.setattr(msmarco_files, "BLOCK_BYTES", 11)
    got = np.concatenate([block for _, block in msmarco_files.iter_int_rows(table, 3, "a b c")])
    assert got.tolist() == [list(r) for r in rows]


def test_collection_refuses_compressed_and_missing(tmp_path):
    gz = tmp_path / "c.tsv.gz"
    gz.write_bytes(gzip.compress(b"1\ta\n"))
    with pytest.raises(ValueError, match="compressed"):
        LazyTextCollection(gz)
    with pytest.raises(FileNotFoundError, match="nothing.tsv"):
        LazyTextCollection(tmp_path / "nothing.tsv")


# ------------------------------------------------------------------------------------- readers
def test_read_queries_and_qrels(marco):
    root, truth = marco
    q = read_queries(root / "queries.train.tsv")
    assert q.ids.tolist() == truth["train_qids"] and q[q.row_of(128)] == "what is query 128"
    assert read_qrels(root / "qrels.train.tsv") == truth["train_qrels"]  # tab separated; rel 0 left out
    assert read_qrels(root / "qrels.dev.small.tsv") == truth["dev_qrels"]  # space separated


def test_read_qrels_by_hand(tmp_path):
    path = write(tmp_path / "q.tsv", ["1 0 10 1", "1\t0\t11\t2", "1 0 10 1", "2 0 12 0", "3 Q0 13 1"][:4])
    assert read_qrels(path) == {1: [10, 11]}
    bad = write(tmp_path / "bad.tsv", ["1 0 10 1", "1 0 ten 1"])
    with pytest.raises(DatasetFormatError, match=rf"{bad} line 2: expected 'qid 0 pid relevance'"):
        read_qrels(bad)


def test_read_qidpidtriples(marco):
    root, truth = marco
    got = read_qidpidtriples(root / "qidpidtriples.train.full.2.tsv")
    expected = {q: unique(n) for q, n in truth["negatives"].items()} | {999: [2]}
    assert {q: got[q].tolist() for q in got} == expected
    sub = read_qidpidtriples(root / "qidpidtriples.train.full.2.tsv", qids=[100, 128], max_per_query=3)
    assert {q: sub[q].tolist() for q in sub} == {100: truth["negatives"][100][:3], 128: truth["negatives"][128][:3]}


def test_read_qidpidtriples_malformed(tmp_path):
    path = write(tmp_path / "t.tsv", ["1\t2\t3", "1\t2", "1\t2\t4"])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: expected 'qid<TAB>positive pid<TAB>negative pid'"):
        read_qidpidtriples(path)
    path = write(tmp_path / "t2.tsv", ["1\t2\t3", "1\t2\t4", "1\t2\tx"])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 3: .*field 3 is not an integer"):
        read_qidpidtriples(path)


def test_read_text_triples(marco):
    root, truth = marco
    t = read_text_triples(root / "triples.train.small.tsv")
    assert len(t) == len(truth["train_qrels"])
    q, p, n = t.triple(0)
    assert (q, p, n) == ("what is query 100", passage(3), passage(truth["negatives"][100][-1]))


def test_read_st_hard_negatives_systems(marco):
    root, truth = marco
    path = root / "msmarco-hard-negatives.jsonl.gz"
    every = read_st_hard_negatives(path)
    assert {q: every.negatives[q].tolist() for q in every.negatives} == {q: unique(s["bm25"] + s["tasb"]) for q, s in truth["st"].items()}
    assert every.positives[128].tolist() == [9, 11]
    tasb = read_st_hard_negatives(path, systems=["tasb"], qids=[100, 107])
    assert {q: tasb.negatives[q].tolist() for q in tasb.negatives} == {100: truth["st"][100]["tasb"], 107: truth["st"][107]["tasb"]}
    with pytest.raises(ValueError, match=r"no line has the system\(s\) \['bm26'\]; the systems present are \['bm25', 'tasb'\]"):
        read_st_hard_negatives(path, systems=["bm26"])


def test_read_jsonl_malformed_lines(tmp_path):
    path = write(tmp_path / "st.jsonl", ['{"qid": 1, "pos": [2], "neg": {"bm25": [3]}}', '{"qid": 1, "pos": [2]'])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 2: not JSON"):
        read_st_hard_negatives(path)
    path = write(tmp_path / "st2.jsonl", ['{"qid": "a", "pos": [2], "neg": {}}'])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 1: qid must be an integer id"):
        read_st_hard_negatives(path)
    path = write(tmp_path / "tev.jsonl", ['{"query_id": "1", "query": "q", "positive_passages": []}'])
    with pytest.raises(DatasetFormatError, match=rf"{path} line 1: no 'negative_passages' key"):
        read_tevatron(path)


def test_read_tevatron(marco, tmp_path):
    root, truth = marco
    got = read_tevatron(root / "train.jsonl.gz")
    assert {q: got.negatives[q].tolist() for q in got.negatives} == truth["tevatron"]
    assert {q: got.positives[q].tolist() for q in got.positives} == truth["train_qrels"]
    assert got.queries[107] == "what is query 107"
    plain = write(tmp_path / "train.jsonl", gzip.decompress((root / "train.jsonl.gz").read_bytes()).decode().splitlines())
    assert read_tevatron(plain, qids=[100]).negatives[100].tolist() == truth["tevatron"][100]


def test_id_lists_join_repeated_keys():
    lists = IdLists.from_segments([5, 1, 5], [2, 1, 2], [7, 8, 9, 8, 7])
    assert {k: lists[k].tolist() for k in lists} == {1: [9], 5: [7, 8]}
    lengths, values = lists.select(np.array([5, 4, 1]))
    assert lengths.tolist() == [2, 0, 1] and values.tolist() == [7, 8, 9]


def test_text_id_is_stable_and_63_bit():
    assert text_id("a passage") == text_id("a passage") != text_id("a passage.")
    assert 0 <= text_id("x") < 2**63
    assert text_id("hello") == 9022087748821825191  # pinned: ids must not change between runs or versions


# ---------------------------------------------------------------------------------- DataModule
def test_datamodule_splits_and_qrels(marco):
    root, truth = marco
    dm = datamodule(root)
    dm.setup("fit")
    train = dm.data.train
    kept = [q for q in truth["train_qids"] if q in truth["train_qrels"]]
    assert list(train.query_ids) == [str(q) for q in kept] and train.num_dropped == 2
    assert [list(r) for r in train.qrels] == [truth["train_qrels"][q] for q in kept]  # pid == corpus row here
    assert train.queries[0] == "what is query 142"
    dev_rows = dm.qrels("validate")
    assert dev_rows == [truth["dev_qrels"][q] for q in truth["dev_qids"]] and dm.qrels("test") == dev_rows
    assert dm.corpus_dataset[3] == {"text": passage(3)} and dm.data.doc_ids[3] == "3"
    queries_loader, corpus_loader = dm.val_dataloader()
    batch = next(iter(queries_loader))
    assert batch["index"].tolist() == [0, 1, 2] and batch["input_ids"].shape[0] == 3
    assert sum(len(b["index"]) for b in corpus_loader) == N_PASSAGES


@pytest.mark.parametrize("source, k", [("qidpidtriples", 2), ("st_jsonl", 3), ("tevatron", 2), ("triples", 1)])
def test_datamodule_train_batch_from_each_source(marco, source, k):
    root, truth = marco
    dm = datamodule(root, train_negatives=source, num_negatives=k)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    B = 4
    assert batch["query_input_ids"].shape[0] == B and batch["doc_input_ids"].shape[0] == B
    assert batch["neg_input_ids"].shape[0] == B * k and batch["neg_attention_mask"].shape == batch["neg_input_ids"].shape
    assert batch["neg_idx"].shape == (B, k) and batch["query_idx"].shape == (B,) and batch["pos_idx"].shape[0] == B
    assert batch["query_idx"].dtype == torch.long
    ds = dm.train_dataset
    for i in range(len(ds)):
        item = ds[(i, 1)]
        assert len(item["negs"]) == k and len(item["neg_idx"]) == k
        if source == "triples":
            assert item["doc_idx"] == text_id(item["doc"]) and item["neg_idx"] == [text_id(item["negs"][0])]
            continue
        qid = int(dm.data.train.query_ids[i])
        pool = {"qidpidtriples": truth["negatives"], "tevatron": truth["tevatron"],
                "st_jsonl": {q: unique(s["bm25"] + s["tasb"]) for q, s in truth["st"].items()}}[source][qid]
        allowed = set(pool) - set(truth["train_qrels"][qid])
        real = [n for n in item["neg_idx"] if n >= 0]
        assert set(real) <= allowed and len(real) == min(k, len(allowed))
        assert all(dm.corpus_dataset[n]["text"] == t for n, t in zip(real, item["negs"]))
        assert item["doc_idx"] in truth["train_qrels"][qid]


def test_datamodule_negative_systems_and_caps(marco):
    root, truth = marco
    dm = datamodule(root, train_negatives="st_jsonl", negative_systems=["tasb"], num_negatives=1, max_train_queries=3)
    dm.prepare_splits()
    assert len(dm.data.train.queries) == 3
    assert [dm.data.negatives[i].tolist() for i in range(3)] == [truth["st"][q]["tasb"] for q in (142, 100, 107)]
    with pytest.raises(ValueError, match="needs train_negatives='st_jsonl'"):
        datamodule(root, train_negatives="tevatron", negative_systems=["bm25"])
    with pytest.raises(ValueError, match="num_negatives must be 0 or 1"):
        datamodule(root, train_negatives="triples", num_negatives=2).prepare_splits()
    with pytest.raises(ValueError, match="needs a hard-negative source.*dynamic_candidates=True"):
        datamodule(root, num_negatives=1)
    dynamic = datamodule(root, num_negatives=1, dynamic_candidates=True)  # an ANN refresh supplies the lists
    dynamic.prepare_splits()
    assert dynamic.data.negatives is None


def test_datamodule_missing_file_lists_folder(tmp_path, marco):
    root, _ = marco
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "collection.tsv").write_bytes((root / "collection.tsv").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"queries.train.tsv is missing from .*partial; the folder has \['collection.tsv'\]; expected"):
        datamodule(partial).prepare_splits()
    with pytest.raises(FileNotFoundError, match=r"qidpidtriples.train.full.2.tsv is missing"):
        for name in ("queries.train.tsv", "qrels.train.tsv", "queries.dev.small.tsv", "qrels.dev.small.tsv"):
            (partial / name).write_bytes((root / name).read_bytes())
        datamodule(partial, train_negatives="qidpidtriples").prepare_splits()


def test_datamodule_unknown_pid_in_qrels(tmp_path, marco):
    root, _ = marco
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("collection.tsv", "queries.train.tsv", "queries.dev.small.tsv", "qrels.dev.small.tsv"):
        (copy / name).write_bytes((root / name).read_bytes())
    write(copy / "qrels.train.tsv", ["100\t0\t3\t1", "107\t0\t4040\t1"])
    with pytest.raises(DatasetFormatError, match=r"qrels.train.tsv names a passage that .*collection.tsv does not have: id 4040"):
        datamodule(copy).prepare_splits()


def test_data_check_counts(marco, capsys):
    root, truth = marco
    dm = datamodule(root, train_negatives="qidpidtriples", num_negatives=2)
    read_texts = []
    original = LazyTextCollection.__getitem__
    LazyTextCollection.__getitem__ = lambda self, row: read_texts.append(row) or original(self, row)
    try:
        dm.prepare_splits()
    finally:
        LazyTextCollection.__getitem__ = original
    assert read_texts == []  # no passage or query text read
    out = capsys.readouterr().out
    assert f"passages        {N_PASSAGES:>12,}" in out
    assert "train                      8 queries with qrels (2 without, dropped)" in out
    assert "dev.small                  3 queries with qrels" in out and "mean 1.33, max 2" in out
    lengths = [len(unique(truth["negatives"][q])) for q in truth["train_qids"] if q in truth["train_qrels"]]
    assert f"mean {np.mean(lengths):.1f}, max {max(lengths)}; 0 train queries without any" in out
    sizes = dm.split_sizes()
    assert sizes["corpus"]["items"] == N_PASSAGES and sizes["train"]["items"] == 8 and sizes["train"]["dropped"] == 2
    assert sizes["train"]["fewer_than_k_negatives"] == 1  # 156 has one candidate


def test_hardneg_data_check_runs_on_the_miniature(marco, tmp_path, capsys):
    from experiments.data_check import main

    root, _ = marco
    config = tmp_path / "data.yaml"
    config.write_text(f"class_path: datamodules.msmarco.MSMARCOPassageDataModule\ninit_args:\n  root: {root}\n"
                      f"  train_negatives: tevatron\n  num_negatives: 2\n  batch_size: 4\n")
    assert main(["check", "--data", str(config)]) == 0
    out = capsys.readouterr().out
    assert "negatives       tevatron" in out and "per train query mean 3.0, max 3" in out
    assert "OK: splits built" in out
    (tmp_path / "empty").mkdir()
    assert main(["check", "--data", str(config), f"--data.init_args.root={tmp_path / 'empty'}"]) == 1
    assert "collection.tsv is missing" in capsys.readouterr().err

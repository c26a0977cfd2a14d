"""``TextInputs(keep_text=True)``: the raw strings of every text field arrive in the batch beside the
tokens (without the role prefix), in the order of the tokenized rows."""

import warnings

import pytest

from datamodules.inputs import TextInputs
from tests.datamodules.test_query_doc import char_tokenizer, decode, tiny

ITEMS = [{"query": "q one", "doc": "d one", "negs": ["n1", "n2"]}, {"query": "q two", "doc": "d two", "negs": ["n3", ""]}]
FIELDS = {"query": "query_", "doc": "doc_", "negs": "neg_"}


@pytest.mark.parametrize("how", ["argument", "data_config"])
def test_raw_texts_beside_the_tokens(how):
    cfg = {"tokenizer": char_tokenizer, "max_length": 16, "query_prefix": "query: "}
    inputs = TextInputs(text_fields=FIELDS, roles={"query": "query"}, keep_text=how == "argument")
    if how == "data_config":
        cfg["keep_text"] = True
    batch = inputs.collate_fn(inputs.resolve(cfg))(ITEMS)
    assert batch["query_text"] == ["q one", "q two"] and batch["doc_text"] == ["d one", "d two"]
    assert batch["neg_text"] == ["n1", "n2", "n3", ""]
    assert decode(batch["query_input_ids"]) == ["query: q one", "query: q two"]  # the tokens keep the prefix
    assert decode(batch["neg_input_ids"]) == batch["neg_text"]


def test_off_by_default():
    inputs = TextInputs(text_fields=FIELDS)
    batch = inputs.collate_fn(inputs.resolve({"tokenizer": char_tokenizer}))(ITEMS)
    assert not any(k.endswith("_text") for k in batch)
    assert "keep_text=True" in repr(TextInputs(keep_text=True))


def test_query_doc_datamodule_batches_carry_the_texts_of_their_ids():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm = tiny(batch_size=3, num_negatives=2, data_config={"tokenizer": char_tokenizer, "max_length": 64, "keep_text": True})
    batch = next(iter(dm.train_dataloader()))
    corpus = dm.data.corpus
    assert batch["doc_text"] == [corpus[i] for i in batch["doc_idx"].tolist()]
    assert batch["neg_text"] == [corpus[i] if i >= 0 else "" for i in batch["neg_idx"].reshape(-1).tolist()]
    assert batch["query_text"] == decode(batch["query_input_ids"])

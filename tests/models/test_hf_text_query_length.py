"""``HFTextEncoder(query_max_length=...)``: queries truncated at their own length, documents at ``max_length``.

References: the packaged MiniLM's tokenizer called directly at each length and its transformers model
run by hand (mean of the real tokens, L2), and an encoder built with ``max_length`` equal to the query
length; the default (``None``) must leave ``data_config`` and ``encode`` exactly as before.
"""

import os

import pytest
import torch
import torch.nn.functional as F

import models
from models import HFTextEncoder
from tests.models.test_hf_text_encoder import SHORT, TEXTS, minilm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUERY_LENGTH = 8  # shorter than most of TEXTS, so truncation changes the embeddings


def by_hand(enc: HFTextEncoder, texts: list[str], max_length: int, prefix: str = "") -> torch.Tensor:
    """The tokenizer at ``max_length`` and the transformers model, pooled by the mean of the real tokens, L2."""
    tokens = enc.tokenizer([prefix + t for t in texts], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = enc.model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_query_length_in_data_config_only_when_set() -> None:
    assert "query_max_length" not in minilm().data_config
    assert minilm().query_max_length is None
    enc = minilm(query_max_length=QUERY_LENGTH)
    assert enc.data_config == {**minilm().data_config, "query_max_length": QUERY_LENGTH}
    assert f"query_max_length={QUERY_LENGTH}" in repr(enc)


def test_encode_query_truncates_at_the_query_length_and_documents_at_max_length() -> None:
    enc = minilm(query_max_length=QUERY_LENGTH)
    lengths = [len(enc.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert sum(n > QUERY_LENGTH for n in lengths) >= 5, "the texts must be longer than the query length"

    queries = enc.encode_query(TEXTS, batch_size=3)
    torch.testing.assert_close(queries, by_hand(enc, TEXTS, QUERY_LENGTH), rtol=0, atol=1e-5)
    torch.testing.assert_close(queries, enc.encode(TEXTS, batch_size=4, max_length=QUERY_LENGTH), rtol=0, atol=1e-6)
    short = HFTextEncoder(models.minilm_l6_path(), max_length=QUERY_LENGTH).eval()
    torch.testing.assert_close(queries, short.encode(TEXTS, batch_size=5), rtol=0, atol=1e-5)

    docs = enc.encode_document(SHORT, batch_size=3)
    torch.testing.assert_close(docs, by_hand(enc, SHORT, enc.max_length), rtol=0, atol=1e-5)
    torch.testing.assert_close(enc.encode(SHORT), docs, rtol=0, atol=1e-6)  # encode's default: max_length, as before
    long_rows = [i for i, n in enumerate(lengths) if n > QUERY_LENGTH]
    assert (queries[long_rows] - enc.encode(TEXTS)[long_rows]).abs().max() > 1e-3, "truncation must change the long texts"


def test_without_query_length_encode_query_is_encode_with_the_prefix() -> None:
    enc = minilm()
    torch.testing.assert_close(enc.encode_query(SHORT), enc.encode(SHORT), rtol=0, atol=0)
    e5_like = HFTextEncoder(models.minilm_l6_path(), query_prefix="query: ", doc_prefix="passage: ", query_max_length=6).eval()
    torch.testing.assert_close(e5_like.encode_query(SHORT), by_hand(e5_like, SHORT, 6, "query: "), rtol=0, atol=1e-5)
    torch.testing.assert_close(e5_like.encode_document(SHORT), by_hand(e5_like, SHORT, e5_like.max_length, "passage: "), rtol=0, atol=1e-5)
    # keyword arguments win over the role's settings
    torch.testing.assert_close(e5_like.encode_query(SHORT, prefix="", max_length=30), by_hand(e5_like, SHORT, 30), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [0, -4, True, 16.0, "16"])
def test_bad_query_length_is_named(bad) -> None:
    with pytest.raises(ValueError, match=f"query_max_length must be a positive int, or None for max_length; got {bad!r}"):
        HFTextEncoder(models.minilm_l6_path(), query_max_length=bad)


def test_query_length_beyond_the_model_and_bad_encode_length_are_named() -> None:
    with pytest.raises(ValueError, match="query_max_length=600 exceeds the 512 tokens"):
        HFTextEncoder(models.minilm_l6_path(), query_max_length=600)
    with pytest.raises(ValueError, match="encode max_length must be a positive int or None"):
        minilm().encode(["a"], max_length=0)


def test_presets_keep_one_length_by_default_and_take_the_override() -> None:
    assert models.create_encoder("minilm-l6").query_max_length is None
    enc = models.create_encoder("minilm-l6", max_length=128, query_max_length=16)
    assert (enc.max_length, enc.query_max_length) == (128, 16)

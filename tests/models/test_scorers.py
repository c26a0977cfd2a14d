"""Teachers (``models.scorers``): a tiny random BERT cross-encoder against its own pairwise forward,
a bi-encoder against brute-force cosines, and score files in every format with their errors."""

import gzip
import json
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from models.scorers import BiEncoderScorer, CrossEncoderScorer, FileScorer

QUERIES = ["a cat sat", "dogs bark loudly"]
CANDS = [["the cat sat on the mat", "a bird", "fish swim"], ["dogs are loud", "cats purr", "a car"]]


def tiny_cross_encoder():
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from models.text_presets import minilm_l6_path

    tok = AutoTokenizer.from_pretrained(minilm_l6_path(check=False))  # a real WordPiece vocabulary, offline
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=1)
    return BertForSequenceClassification(config).eval(), tok


def test_cross_encoder_scores_each_pair_like_its_model():
    model, tok = tiny_cross_encoder()
    scorer = CrossEncoderScorer(model=model, tokenizer=tok, batch_size=4)
    got = scorer.score(QUERIES, CANDS)
    assert got.shape == (2, 3) and not got.requires_grad
    for i, q in enumerate(QUERIES):
        for j, c in enumerate(CANDS[i]):
            with torch.no_grad():
                ref = model(**tok(q, c, return_tensors="pt")).logits[0, 0]
            assert got[i, j].item() == pytest.approx(ref.item(), abs=1e-5)
    sig = CrossEncoderScorer(model=model, tokenizer=tok, activation="sigmoid").score(QUERIES, CANDS)
    torch.testing.assert_close(sig, torch.sigmoid(got))
    with pytest.raises(ValueError, match="candidate lists of lengths"):
        scorer.score(QUERIES, [CANDS[0], CANDS[1][:2]])
    with pytest.raises(ValueError, match="model_name_or_path"):
        CrossEncoderScorer()


class CharEncoder(torch.nn.Module):
    def encode(self, texts, batch_size=64):
        out = torch.zeros(len(texts), 26)
        for i, t in enumerate(texts):
            for ch in t:
                if ch.isalpha():
                    out[i, ord(ch.lower()) - 97] += 1
        return out


def test_bi_encoder_is_the_cosine_of_its_embeddings():
    enc = CharEncoder()
    got = BiEncoderScorer(enc).score(QUERIES, CANDS)
    for i, q in enumerate(QUERIES):
        for j, c in enumerate(CANDS[i]):
            ref = F.cosine_similarity(enc.encode([q]), enc.encode([c]))[0]
            assert got[i, j].item() == pytest.approx(ref.item(), abs=1e-6)
    dot = BiEncoderScorer(enc, similarity="dot").score(QUERIES, CANDS)
    assert dot[0, 0].item() == pytest.approx(float(enc.encode([QUERIES[0]])[0] @ enc.encode([CANDS[0][0]])[0]))
    with pytest.raises(TypeError, match="encode"):
        BiEncoderScorer(torch.nn.Linear(2, 2))


TABLE = {1185869: {0: 9.5, 8213: -1.25, 77: 3.0}, 42: {5: 0.5}}


@pytest.mark.parametrize("fmt", ["pkl.gz", "pkl", "json", "json.gz", "tsv", "tsv.gz"])
def test_file_scorer_reads_every_format(tmp_path, fmt):
    path = tmp_path / f"scores.{fmt}"
    opener = gzip.open if fmt.endswith(".gz") else open
    if fmt.startswith("pkl"):
        with opener(path, "wb") as f:
            pickle.dump(TABLE, f)
    elif fmt.startswith("json"):
        with opener(path, "wt") as f:
            json.dump(TABLE, f)
    else:
        with opener(path, "wt") as f:
            f.writelines(f"{q}\t{p}\t{s}\n" for q, row in TABLE.items() for p, s in row.items())
    scorer = FileScorer(path, missing="ignore")
    got = scorer.score(torch.tensor([1185869, 42]), torch.tensor([[0, 8213, 77], [5, -1, 7]]))
    assert got[0].tolist() == [9.5, -1.25, 3.0]
    assert got[1, 0].item() == 0.5 and math.isnan(got[1, 1]) and math.isnan(got[1, 2])
    # batch rows mapped to the file's ids
    scorer.bind_ids(query_ids=["x", "1185869"], doc_ids={3: "77", 4: "0"})
    assert scorer.score(torch.tensor([1]), torch.tensor([[4, 3]])).tolist() == [[9.5, 3.0]]


def test_file_scorer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no score file"):
        FileScorer(tmp_path / "absent.pkl")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\t2\t3.0\n1\t2\n")
    with pytest.raises(ValueError, match="line 2"):
        FileScorer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a mapping"):
        FileScorer(wrong)
    good = tmp_path / "s.tsv"
    good.write_text("1\t2\t3.0\n")
    with pytest.raises(KeyError, match="no score for query '1' and document '9'"):
        FileScorer(good).score(torch.tensor([1]), torch.tensor([[2, 9]]))
    with pytest.raises(ValueError, match=r"\[B, 1 \+ k\]"):
        FileScorer(good).score(torch.tensor([1]), torch.tensor([2, 9]))
    with pytest.raises(ValueError, match="suffix"):
        (tmp_path / "s.csv").write_text("x")
        FileScorer(tmp_path / "s.csv")

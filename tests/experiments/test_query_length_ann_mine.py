"""The query length reaches the callers that encode queries outside the train batches: ``ANNRefresh``
(through the DataModule's evaluation query collate) and ``hardneg mine`` (through ``encode``).

References: ``char_tokenizer`` at each length for the refresh (a spy records what the towers were given),
and ``mine_hard_negatives`` on embeddings computed in the test with the query length for ``hardneg mine``.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.callbacks.ann_refresh import ANNRefresh
from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, TinyQueryDoc, char_tokenizer, decode
from tests.experiments.test_ann_refresh import fit
from tests.experiments.test_mine_cli import PIDS, QIDS, data_yaml, mine, read_lines, tiny_bert  # noqa: F401 (fixtures)
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, sgd0

pytestmark = pytest.mark.filterwarnings("ignore:IntIdsQueryDoc test split")
QUERY_LENGTH, MAX_LENGTH = 6, 48


def test_ann_refresh_encodes_queries_at_the_query_length(monkeypatch):
    import experiments.callbacks.ann_refresh as ann

    seen: list[tuple[list[str], list[str]]] = []  # (texts, what the tower was given, decoded)
    real = ann._encode

    def spy(encoder, texts, collate, *args):
        batch = collate([{"text": t} for t in texts])
        seen.append((list(texts), decode(batch["input_ids"])))
        return real(encoder, texts, collate, *args)

    monkeypatch.setattr(ann, "_encode", spy)
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    dm = TinyQueryDoc(batch_size=4, num_negatives=2, num_workers=0, seed=3,
                      data_config={"tokenizer": char_tokenizer, "max_length": MAX_LENGTH, "query_max_length": QUERY_LENGTH})
    fit(module, dm, [ANNRefresh(top_k=3, every_n_epochs=None, first="untrained")], max_steps=1)
    calls = {tuple(texts): given for texts, given in seen}
    assert calls[tuple(CORPUS)] == [d[:MAX_LENGTH] for d in CORPUS]
    assert calls[tuple(TRAIN_Q)] == [q[:QUERY_LENGTH] for q in TRAIN_Q]
    assert any(len(q) > QUERY_LENGTH for q in TRAIN_Q)

    # and the candidates are those of the truncated queries: brute force on the towers' outputs
    with torch.no_grad():
        module.eval()
        q = module.query_encoder(char_tokenizer(list(TRAIN_Q), QUERY_LENGTH)).numpy()
        d = module.documents(char_tokenizer(list(CORPUS), MAX_LENGTH)).numpy()
    q, d = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
    sims = q @ d.T
    store = dm.candidate_store
    got = np.asarray(store.load(store.version)["pos_scores"])
    np.testing.assert_allclose(got, [sims[i, rel].min() for i, rel in enumerate(TRAIN_QRELS)], atol=1e-5)


def test_mine_encodes_queries_at_the_query_length(tiny_bert, data_yaml, tmp_path, monkeypatch):  # noqa: F811
    """``hardneg mine`` with a query tower that has a query length: the JSONL equals the mining function on
    queries encoded at that length (and differs from the one-length result)."""
    import experiments.mine as mine_cli
    from miners import mine_hard_negatives
    from models.hf_text_encoder import HFTextEncoder

    encoder = HFTextEncoder(tiny_bert, query_max_length=3)  # "[CLS] question [SEP]": the query's number is cut
    calls = []
    real_encode = HFTextEncoder.encode

    def spy(self, texts, *args, **kwargs):
        calls.append((list(texts), kwargs.get("max_length")))
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(HFTextEncoder, "encode", spy)
    monkeypatch.setattr(mine_cli, "load_encoders", lambda model, config=None: (encoder, encoder))
    out = tmp_path / "negatives.jsonl"
    assert mine(tiny_bert, data_yaml, out, "--num-negatives", "3") == 0
    assert [length for texts, length in calls if texts[0] in TRAIN_Q] == [3, 3, 3]  # chunks of 3 queries
    assert [length for texts, length in calls if texts[0] in CORPUS] == [None]  # documents at max_length

    def expected(length):
        ref = HFTextEncoder(tiny_bert)
        corpus_emb = real_encode(ref, list(CORPUS), batch_size=4)
        lines = []
        for start in range(0, len(TRAIN_Q), 3):
            q = real_encode(ref, TRAIN_Q[start : start + 3], batch_size=4, max_length=length)
            qrels = TRAIN_QRELS[start : start + 3]
            ids = mine_hard_negatives(q, corpus_emb, qrels, max_positives=3, seed=random.Random(f"0:{start}"), num_negatives=3)
            for row, neg in enumerate(ids.tolist()):
                lines.append({"qid": QIDS[start + row], "pos": [PIDS[d] for d in qrels[row]],
                              "neg": {Path(tiny_bert).name: [PIDS[d] for d in neg if d >= 0]}})
        return lines

    assert read_lines(out) == expected(3)
    assert expected(3) != expected(None), "the query length must change the mined lists for this test to mean anything"

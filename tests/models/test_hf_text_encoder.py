"""HFTextEncoder and every registered text preset, on the packaged all-MiniLM-L6-v2 (no hub).

References: sentence-transformers' ``SentenceTransformer.encode`` for the preset end to end, and
poolings written out row by row from the model's ``last_hidden_state`` for the rest.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

import models
from datamodules.inputs import TextInputs, load_tokenizer
from models import HFTextEncoder, text_presets
from models.timm_encoder import PretrainedWeightsUnavailable
from tests.helpers import oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT_PRESETS = [i["name"] for i in models.list_encoders() if i["modality"] == "text"]
# Lengths from one word to past the 256-token limit (one text, to keep the test fast), so sorting,
# padding and truncation all matter.
LONG = "hard negatives " * 90  # 272 tokens
SHORT = [
    "cat",
    "A man is playing a guitar on the stage while the crowd sings along.",
    "Which bird has the largest wingspan?",
    "The wandering albatross has the largest wingspan of any living bird, up to 3.5 metres.",
    "ok",
    "Stanford Online Products holds 120,053 images of 22,634 products sold on eBay.",
    " ".join(f"word{i}" for i in range(12)),
    "Metric learning maps similar items close together and dissimilar ones far apart.",
    "x y z",
    "A photo of a dog.",
]
TEXTS = SHORT[:2] + [LONG] + SHORT[2:]
_cache: dict = {}


def minilm(**overrides) -> HFTextEncoder:
    """One eval-mode build per set of overrides for the read-only checks."""
    key = tuple(sorted(overrides.items()))
    if key not in _cache:
        _cache[key] = models.create_encoder("minilm-l6", **overrides).eval()
    return _cache[key]


def tokenize(enc: HFTextEncoder, texts, side: str = "right") -> dict:
    tok = load_tokenizer(enc.data_config["tokenizer"])
    tok.padding_side = side
    out = tok(list(texts), padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt")
    assert (out["attention_mask"] == 0).any(), "the batch must contain padding"
    return dict(out)


def test_minilm_encode_matches_sentence_transformers() -> None:
    st = oracle("sentence_transformers")
    path = models.minilm_l6_path()
    ref = st.SentenceTransformer(str(path), device="cpu").encode(TEXTS, batch_size=4, normalize_embeddings=True, convert_to_tensor=True)
    enc = models.create_encoder("minilm-l6").train()
    emb = enc.encode(TEXTS, batch_size=4)  # 11 texts: three batches, the last one partial
    assert enc.training, "encode must restore the train mode"
    assert emb.shape == (len(TEXTS), 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    torch.testing.assert_close(emb, ref.cpu().float(), rtol=0, atol=1e-5)
    # batching does not change a row: one text at a time gives the same embeddings
    torch.testing.assert_close(enc.encode(TEXTS, batch_size=1), emb, rtol=0, atol=1e-5)
    assert enc.encode([]).shape == (0, 384)


def test_minilm_settings_follow_its_sentence_transformers_config() -> None:
    folder = models.minilm_l6_path()
    with open(os.path.join(folder, "sentence_bert_config.json")) as f:
        assert json.load(f)["max_seq_length"] == text_presets.MINILM_MAX_LENGTH
    with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    enc = minilm()
    assert enc.pooling == "mean" and enc.normalize and enc.embed_dim == pooling["word_embedding_dimension"]
    assert enc.data_config == {"tokenizer": folder, "max_length": 256}
    assert isinstance(enc.data_config["tokenizer"], str)


def test_a_new_encoder_trains_with_dropout_and_encode_does_not() -> None:
    enc = models.create_encoder("minilm-l6")  # a fresh build (minilm() caches eval-mode ones)
    assert all(m.training for m in enc.modules()), "from_pretrained's eval mode leaked: fine-tuning would run without dropout"
    batch = tokenize(enc, TEXTS)
    torch.manual_seed(0)
    a, b = enc(batch), enc(batch)
    assert not torch.allclose(a, b)  # dropout (0.1 in MiniLM) is on
    torch.testing.assert_close(enc.encode(TEXTS, batch_size=8), enc.encode(TEXTS, batch_size=2), rtol=0, atol=1e-5)
    assert enc.training  # encode restores the mode


def test_forward_on_collated_batch_equals_encode() -> None:
    enc = minilm()
    pipeline = TextInputs()
    collate = pipeline.collate_fn(pipeline.resolve(enc.data_config))  # the DataModule's path
    batch = collate([{"text": t, "label": i} for i, t in enumerate(TEXTS)])
    assert batch["input_ids"].shape[1] == 256  # the long text is truncated to max_length
    with torch.no_grad():
        emb = enc(batch)  # extra keys (label) are ignored
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, enc.encode(TEXTS, batch_size=3), rtol=0, atol=1e-5)


def rows_reference(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    out = []
    for h, m in zip(hidden.double(), mask):
        real = torch.nonzero(m).flatten().tolist()
        out.append({"cls": h[real[0]], "last": h[real[-1]], "mean": h[real].mean(dim=0)}[mode])
    return torch.stack(out)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", ["cls", "last", "mean"])
def test_pooling_matches_hidden_states_row_by_row(mode: str, side: str) -> None:
    enc = minilm(pooling=mode, normalize=False)
    tokens = tokenize(enc, SHORT[:6], side)
    mask = tokens["attention_mask"]
    pad_col = 0 if side == "left" else -1
    assert (mask[:, pad_col] == 0).any()  # padding really is on that side
    with torch.no_grad():
        hidden = enc.model(**tokens).last_hidden_state
        emb = enc(tokens)
    expected = rows_reference(hidden, mask, mode)
    torch.testing.assert_close(emb.double(), expected, rtol=1e-5, atol=1e-5)
    if (mode, side) in (("cls", "left"), ("last", "right")):  # control: a pooling that ignores the mask picks padding here
        naive = hidden[:, 0 if mode == "cls" else -1].double()
        assert (emb.double() - naive).abs().max() > 1e-2


def test_head_changes_dim_and_normalize_gives_unit_norm() -> None:
    torch.manual_seed(0)
    raw = minilm(embed_dim=32, normalize=False)
    unit = minilm(embed_dim=32)
    unit.head.load_state_dict(raw.head.state_dict())
    tokens = tokenize(raw, SHORT[:5])
    with torch.no_grad():
        pooled = rows_reference(raw.model(**tokens).last_hidden_state, tokens["attention_mask"], "mean")
        expected = F.linear(pooled, raw.head.weight.double(), raw.head.bias.double())
        z, z_unit = raw(tokens), unit(tokens)
    assert raw.embed_dim == 32 and raw.hidden_size == 384 and z.shape == (5, 32)
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_unit.double(), expected / expected.norm(dim=1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_unit.norm(dim=1), torch.ones(5))
    assert (z.norm(dim=1) - 1).abs().max() > 1e-2  # normalize=False really is raw
    assert unit.encode(SHORT).shape == (len(SHORT), 32)


def test_encode_prefix_and_order() -> None:
    enc = minilm()
    with_prefix = enc.encode(["albatross", "what flies far"], prefix="query: ")
    torch.testing.assert_close(with_prefix, enc.encode(["query: albatross", "query: what flies far"]), rtol=0, atol=1e-6)
    reversed_ = enc.encode(SHORT[::-1], batch_size=4)
    torch.testing.assert_close(reversed_.flip(0), enc.encode(SHORT, batch_size=4), rtol=0, atol=1e-5)


def test_training_gradients_with_and_without_checkpointing() -> None:
    tokens = None
    grads = []
    for checkpointing in (False, True):
        enc = models.create_encoder("minilm-l6", embed_dim=8, gradient_checkpointing=checkpointing).train()
        assert any(getattr(m, "gradient_checkpointing", False) for m in enc.model.modules()) == checkpointing
        tokens = tokens or tokenize(enc, SHORT[:4])
        torch.manual_seed(1)
        enc.head.reset_parameters()
        torch.manual_seed(2)  # the same dropout masks in both runs
        enc(tokens).sum().backward()
        layer = enc.model.encoder.layer[0].attention.self.query.weight
        assert layer.grad is not None and layer.grad.abs().sum() > 0
        assert all(p.grad is None for p in enc.model.pooler.parameters())  # unused pooler: frozen
        grads.append(layer.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_wrong_sha256_fails_naming_the_file_and_both_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(text_presets, "MINILM_SHA256", "0" * 64)
    with pytest.raises(ValueError) as info:
        models.create_encoder("minilm-l6")
    message = str(info.value)
    actual = text_presets.file_sha256(os.path.join(text_presets.minilm_l6_path(check=False), "model.safetensors"))
    assert "model.safetensors" in message and "0" * 64 in message and actual in message and "reinstall" in message


@pytest.mark.parametrize("name", TEXT_PRESETS)
def test_every_text_preset_builds_offline_or_names_its_hub_weights(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Packaged presets build and match their registered embed_dim; hub presets fail at once offline
    with the hub id of their ``weights`` field and how to give a local folder."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    info = models.get_preset_info(name)
    if info.weights.startswith("packaged"):
        enc = minilm() if name == "minilm-l6" else models.create_encoder(name).eval()
        assert enc.embed_dim == info.embed_dim
        assert enc.encode(SHORT[:2]).shape == (2, info.embed_dim)
        return
    assert info.weights.startswith("hub: ")
    hub_id = info.weights.split()[1]
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        models.create_encoder(name)
    message = str(err.value)
    assert f"hub model {hub_id}:" in message and "offline" in message
    assert "overrides: {model_name_or_path: /path/to/folder}" in message


def test_hub_presets_settings() -> None:
    """The hub presets' settings without the hub: each builder given the packaged folder instead."""
    folder = models.minilm_l6_path()
    e5 = models.create_encoder("e5-base", model_name_or_path=folder)
    assert e5.data_config == {"tokenizer": folder, "max_length": 512, "query_prefix": "query: ", "doc_prefix": "passage: "}
    assert e5.pooling == "mean" and e5.normalize
    bert = models.create_encoder("bert-base", model_name_or_path=folder)
    assert bert.pooling == "mean" and bert.max_length == 256


def test_bad_arguments_and_inputs_are_named(tmp_path) -> None:
    folder = models.minilm_l6_path()
    with pytest.raises(ValueError, match="pooling must be one of"):
        HFTextEncoder(folder, pooling="max")
    with pytest.raises(ValueError, match="max_length=1000 exceeds the 512"):
        HFTextEncoder(folder, max_length=1000)
    with pytest.raises(ValueError, match="embed_dim"):
        HFTextEncoder(folder, embed_dim=-3)
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        HFTextEncoder(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        HFTextEncoder(str(tmp_path))
    enc = minilm()
    tokens = tokenize(enc, SHORT[:3])
    with pytest.raises(KeyError, match="attention_mask.*query_"):
        enc({"input_ids": tokens["input_ids"]})
    with pytest.raises(TypeError, match="mapping with input_ids"):
        enc(tokens["input_ids"])
    with pytest.raises(ValueError, match=r"must both be \[B, L\]"):
        enc({"input_ids": tokens["input_ids"][0], "attention_mask": tokens["attention_mask"][0]})
    with pytest.raises(TypeError, match="wrap a single text in a list"):
        enc.encode("one text")
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        enc.encode(["a", 3])
    with pytest.raises(ValueError, match="batch_size"):
        enc.encode(["a"], batch_size=0)


def test_yaml_builds_the_class_and_the_preset() -> None:
    import yaml
    from jsonargparse import ArgumentParser
    from torch import nn

    folder = models.minilm_l6_path()
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--encoder", type=nn.Module)
    for text in (
        f"encoder: {{class_path: models.HFTextEncoder, init_args: {{model_name_or_path: {folder}, pooling: cls, embed_dim: 16}}}}",
        "encoder: {class_path: models.preset, init_args: {name: minilm-l6, overrides: {pooling: cls, embed_dim: 16}}}",
    ):
        enc = parser.instantiate(parser.parse_object(yaml.safe_load(text))).encoder
        assert isinstance(enc, HFTextEncoder) and enc.pooling == "cls" and enc.embed_dim == 16

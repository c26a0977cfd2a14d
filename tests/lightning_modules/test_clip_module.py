"""``CLIPModule`` on the offline Fashion-MNIST scenes: its loss equals CLIP/NegCLIP/TripletCLIP on the
batch, validation equals the metric functions on the towers' embeddings, the logit scale is clamped,
gradient caching equals the uncached step, DDP (2 gloo processes, local loss) equals one process on
the global batch, and the offline Lite0 + MiniLM preset trains and evaluates."""

import math

import lightning as L
import pytest
import torch
from torch import nn

from datamodules.fashion_mnist import DEBIAN_ROOT
from datamodules.fashion_scenes import generate_scenes
from datamodules.image_text import ImageTextDataModule
from lightning_modules.clip_module import CLIPModule
from lightning_modules.metrics import image_text_retrieval, zero_shot_accuracy
from losses import CLIPLoss, NegCLIPLoss, SigLIPLoss, TripletCLIPLoss
from tests.datamodules.test_image_text import char_tokenizer
from tests.helpers import StepRecorder, quiet, require_path, sgd, sgd0
from tests.helpers import cpu_trainer as trainer

SIZE = 32


class TinyCLIP(nn.Module):
    """A linear image tower on 32 px and a character-bag text tower, with CLIP's logit scale."""

    embed_dim = 16

    def __init__(self, seed: int = 0, bias: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.image = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(3 * 64, self.embed_dim))
        self.chars = nn.Embedding(256, 24)
        self.text = nn.Linear(24, self.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07) if not bias else math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if bias else None

    @property
    def data_config(self):
        return {"tokenizer": char_tokenizer, "context_length": 96, "input_size": (3, SIZE, SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                "interpolation": "bilinear", "crop_pct": 1.0}

    def encode_image(self, x):
        return nn.functional.normalize(self.image(x), dim=-1)

    def encode_text(self, ids):
        mask = (ids > 0).unsqueeze(-1).float()
        pooled = (self.chars(ids.clamp(max=255)) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return nn.functional.normalize(self.text(pooled), dim=-1)

    def clamp_logit_scale_(self):
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    return generate_scenes(tmp_path_factory.mktemp("scenes"), n_train=64, n_test=24, seed=0, shard_size=32, with_negatives=True)


def datamodule(scenes, batch_size=8, **kw):
    return ImageTextDataModule(train=str(scenes.train_csv), test=str(scenes.test_csv), batch_size=batch_size, num_workers=0, num_batches=1,
                               zero_shot="fashion_mnist", zero_shot_size=40, augment=False, seed=5, **kw)


def first_batch(dm, module):
    dm.trainer = type("T", (), {"global_rank": 0, "world_size": 1, "lightning_module": module})()
    quiet(dm.setup, "fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("hard_negatives", ["none", "text", "text_and_image"])
def test_step_loss_equals_the_paper_loss_on_the_batch(scenes, hard_negatives):
    model = TinyCLIP()
    module = CLIPModule(model, CLIPLoss(), hard_negatives=hard_negatives)
    batch = first_batch(datamodule(scenes), module)
    assert batch["has_neg"].all()
    loss = module.run_step(module.embed(batch))["loss"]
    img, txt = model.encode_image(batch["image"]), model.encode_text(batch["text"])
    scale = model.logit_scale.exp()
    if hard_negatives == "none":
        ref = CLIPLoss()(img, txt, scale)
    elif hard_negatives == "text":
        ref = NegCLIPLoss()(img, txt, model.encode_text(batch["neg_text"]), scale)
    else:
        ref = TripletCLIPLoss()(img, txt, model.encode_image(batch["neg_image"]), model.encode_text(batch["neg_text"]), scale)
    torch.testing.assert_close(loss, ref)


def test_siglip_takes_the_bias(scenes):
    model = TinyCLIP(bias=True)
    module = CLIPModule(model, SigLIPLoss())
    batch = first_batch(datamodule(scenes), module)
    loss = module.run_step(module.embed(batch))["loss"]
    ref = SigLIPLoss()(model.encode_image(batch["image"]), model.encode_text(batch["text"]), model.logit_scale.exp(), model.logit_bias)
    torch.testing.assert_close(loss, ref)


def test_siglip_without_a_bias_is_refused_at_construction():
    with pytest.raises(ValueError, match="SigLIPLoss needs the model's logit bias.*TinyCLIP has none"):
        CLIPModule(TinyCLIP(bias=False), SigLIPLoss())
    CLIPModule(TinyCLIP(bias=False), CLIPLoss())  # a softmax loss takes none


def test_fit_clamps_the_scale_and_validation_equals_the_metric_functions(scenes):
    model = TinyCLIP()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100) + 1.0)
    module = CLIPModule(model, CLIPLoss(), optimizer=sgd)
    dm = datamodule(scenes)
    quiet(trainer(max_steps=1, limit_val_batches=0).fit, module, datamodule=dm)
    assert model.logit_scale.item() <= math.log(100) + 1e-6
    metrics = quiet(trainer().validate, module, datamodule=dm, verbose=False)[0]
    loaders = dm.val_dataloader()
    with torch.no_grad():
        images = torch.cat([model.encode_image(b["image"]) for b in loaders[0]])
        texts, owner = zip(*[(model.encode_text(b["text"]), b["image_index"]) for b in loaders[1]])
        zs = [(model.encode_image(b["image"]), b["label"]) for b in loaders[2]]
        prompts = [t.format(c) for c in dm.zero_shot_classes for t in dm.zero_shot_templates]
        classes = model.encode_text(char_tokenizer(prompts)).view(len(dm.zero_shot_classes), len(dm.zero_shot_templates), -1)
    ref = image_text_retrieval(images, torch.cat(texts), torch.cat(owner), ks=(1, 5, 10))
    for key in ("i2t_r@1", "i2t_r@5", "t2i_r@1", "t2i_r@5"):
        assert metrics[f"val/{key}"] == pytest.approx(ref[key], abs=1e-6)
    zref = zero_shot_accuracy(torch.cat([z[0] for z in zs]), classes, torch.cat([z[1] for z in zs]))
    assert metrics["val/zero_shot_acc@1"] == pytest.approx(zref["acc@1"], abs=1e-6)


def grads_after_one_step(scenes, chunk, hard_negatives="text_and_image"):
    module = CLIPModule(TinyCLIP(), CLIPLoss(), hard_negatives=hard_negatives, optimizer=sgd0, grad_cache_chunk_size=chunk)
    grads = {}

    class Keep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    quiet(trainer(max_steps=1, limit_val_batches=0, callbacks=[Keep()]).fit, module, datamodule=datamodule(scenes))
    return grads


def test_gradient_caching_equals_the_uncached_step(scenes):
    plain, cached = grads_after_one_step(scenes, None), grads_after_one_step(scenes, 3)
    assert plain.keys() == cached.keys() and "model.logit_scale" in plain
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)


def run(scenes, tmp_path, devices, hard_negatives):
    module = CLIPModule(TinyCLIP(), CLIPLoss(), hard_negatives=hard_negatives, optimizer=sgd0, gather="local")
    out = str(tmp_path / f"{hard_negatives}{devices}")
    quiet(trainer(devices, max_steps=1, limit_val_batches=0, callbacks=[StepRecorder(out)]).fit, module, datamodule=datamodule(scenes, batch_size=8 // devices))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("hard_negatives", ["none", "text_and_image"])
def test_ddp_local_loss_equals_one_process_on_the_global_batch(scenes, tmp_path, hard_negatives):
    single, ddp = run(scenes, tmp_path, 1, hard_negatives), run(scenes, tmp_path, 2, hard_negatives)
    ref, ref_loss = torch.load(f"{single}.rank0"), torch.load(f"{single}.loss0")
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(f"{ddp}.loss{rank}"), ref_loss, rtol=1e-5, atol=1e-6)
        grads = torch.load(f"{ddp}.rank{rank}")
        assert grads.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_offline_preset_trains_and_evaluates(scenes):
    from models import create_encoder

    model = create_encoder("lite0-minilm-clip", image_size=SIZE)
    module = CLIPModule(model, CLIPLoss(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4))
    dm = datamodule(scenes, batch_size=4)
    t = trainer(max_steps=1, limit_val_batches=0)
    quiet(t.fit, module, datamodule=dm)
    assert torch.isfinite(t.callback_metrics["train/loss"])
    metrics = quiet(trainer().validate, module, datamodule=dm, verbose=False)[0]
    assert 0 <= metrics["val/i2t_r@1"] <= 1 and 0 <= metrics["val/zero_shot_acc@1"] <= 1


def test_bf16_autocast_trains_with_float32_logits(scenes):
    model = TinyCLIP()
    module = CLIPModule(model, CLIPLoss(), optimizer=sgd)
    t = trainer(max_steps=1, limit_val_batches=0, precision="bf16-mixed")
    quiet(t.fit, module, datamodule=datamodule(scenes))
    loss = t.callback_metrics["train/loss"]
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    batch = first_batch(datamodule(scenes), module)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = module.embed(batch)
        assert inputs["emb"].dtype == torch.bfloat16  # the towers ran in bf16
        out = module.run_step(inputs)
    assert out["loss"].dtype == torch.float32  # the step computed the logits and the loss in float32
    ref = CLIPLoss()(inputs["emb"].float(), inputs["ref_emb"].float(), model.logit_scale.exp())
    torch.testing.assert_close(out["loss"], ref)

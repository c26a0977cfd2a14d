"""``DualEncoderModule``: trains on the query/document contract, evaluates ranking on the whole corpus
(equal to ``ranking_metrics`` on the encoders' embeddings), equals its uncached step under gradient
caching, and under DDP (2 gloo processes) equals one process on the global batch."""

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn

from lightning_modules.dual_encoder_module import DualEncoderModule
from lightning_modules.metrics import ranking_metrics
from losses import CLIPLoss, NTXentLoss
from tests.datamodules.test_query_doc import TinyQueryDoc, char_tokenizer
from tests.helpers import StepRecorder, sgd, sgd0
from tests.helpers import cpu_trainer as trainer


class CharBagEncoder(nn.Module):
    """Mean of character embeddings over the attention mask, then a linear layer (a tiny text tower)."""

    embed_dim = 16

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(256, 24)
        self.proj = nn.Linear(24, self.embed_dim)

    @property
    def data_config(self):
        return {"tokenizer": char_tokenizer, "max_length": 48}

    def forward(self, inputs):
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        pooled = (self.emb(inputs["input_ids"].clamp(max=255)) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.proj(pooled)


def datamodule(batch_size=4, **kwargs):
    return TinyQueryDoc(batch_size=batch_size, num_negatives=2, num_workers=0, num_batches=1, seed=3, **kwargs)


def fit_one_step(module, dm, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=1, limit_val_batches=0, **kwargs).fit(module, datamodule=dm)
    return module


@pytest.mark.parametrize("loss", [CLIPLoss(symmetric=False), NTXentLoss(temperature=0.05)], ids=["infonce", "ntxent"])
def test_fits_and_evaluates_the_whole_corpus_like_ranking_metrics(loss):
    module = DualEncoderModule(CharBagEncoder(), loss, optimizer=sgd, eval_ks=(1, 5, 10))
    dm = datamodule()
    before = [p.detach().clone() for p in module.parameters()]
    fit_one_step(module, dm)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer().validate(module, datamodule=dm, verbose=False)[0]
    dm.setup("validate")
    split = dm.split("validate")
    enc = module.query_encoder.eval()
    with torch.no_grad():
        q = enc(char_tokenizer(list(split.queries), 48))
        d = enc(char_tokenizer(list(dm.data.corpus), 48))
    ref = ranking_metrics(q, d, dm.qrels("validate"), ks=(1, 5, 10))
    for key in ("mrr@10", "ndcg@10", "recall@5"):
        assert metrics[f"val/{key}"] == pytest.approx(ref[key], abs=1e-6)


def test_learned_temperature_is_a_parameter_and_clamped():
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd, temperature=0.001, learn_temperature=True)
    assert isinstance(module.logit_scale, nn.Parameter) and module.logit_scale.item() > math.log(100)
    fit_one_step(module, datamodule())
    assert module.logit_scale.item() <= math.log(100) + 1e-6
    with pytest.raises(ValueError, match="two-view loss"):
        DualEncoderModule(CharBagEncoder(), NTXentLoss(), learn_temperature=True)


def test_separate_towers_and_a_document_queue():
    module = DualEncoderModule(CharBagEncoder(0), CLIPLoss(symmetric=False), doc_encoder=CharBagEncoder(1), memory_size=8, optimizer=sgd)
    fit_one_step(module, datamodule(), max_epochs=1)
    assert module.doc_encoder is not module.query_encoder and len(module.step.memory) > 0


def grads_after_one_step(chunk):
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=True), optimizer=sgd0, grad_cache_chunk_size=chunk)
    grads = {}

    class Keep(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None})

    fit_one_step(module, datamodule(), callbacks=[Keep()])
    return grads


def test_gradient_caching_equals_the_uncached_step():
    plain, cached = grads_after_one_step(None), grads_after_one_step(3)
    assert plain.keys() == cached.keys() and plain
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-6)  # float32 sums in another order


def run(tmp_path, devices, gather):
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=True), optimizer=sgd0, gather=gather)
    out = str(tmp_path / f"{gather}{devices}")
    fit_one_step(module, datamodule(batch_size=4 // devices), devices=devices, callbacks=[StepRecorder(out)])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("gather", ["global", "local"])
def test_ddp_equals_one_process_on_the_global_batch(tmp_path, gather):
    single, ddp = run(tmp_path, 1, gather), run(tmp_path, 2, gather)
    ref, ref_loss = torch.load(f"{single}.rank0"), torch.load(f"{single}.loss0")
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(f"{ddp}.loss{rank}"), ref_loss, rtol=1e-5, atol=1e-7)
        grads = torch.load(f"{ddp}.rank{rank}")
        assert grads.keys() == ref.keys()
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-6)

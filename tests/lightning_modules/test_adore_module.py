"""``ADOREModule``: the step's negatives are the frozen index's top-k minus the query's positives (brute
force over the stored corpus embeddings), the document tower gets no gradient and does not change, the
loss equals InfoNCE written out on the stored embeddings (raw dot products, as ``CLIPLoss``), one fit step runs, an embeddings file loads."""

import warnings

import lightning as L
import numpy as np
import pytest
import torch

from lightning_modules.adore_module import ADOREModule
from losses import CLIPLoss, TripletMarginLoss
from tests.datamodules.test_query_doc import CORPUS, TinyQueryDoc, char_tokenizer
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, sgd, trainer


class Capture(L.Callback):
    def __init__(self):
        self.batches, self.negs, self.losses, self.doc_grads = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        self.negs.append(pl_module._last_negatives.clone())
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.doc_grads.append([p.grad for p in pl_module.doc_encoder.parameters()])


def datamodule():
    return TinyQueryDoc(batch_size=4, num_negatives=0, num_workers=0, num_batches=1, seed=3)


def fit(module, dm, steps=2, **kwargs):
    cap = Capture()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=steps, limit_val_batches=0, callbacks=[cap], **kwargs).fit(module, datamodule=dm)
    return cap


def corpus_embeddings(encoder):
    with torch.no_grad():
        return encoder.eval()(char_tokenizer(list(CORPUS), 48))


def brute_force_negatives(q, corpus, pos_idx, k):
    qn, dn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(corpus, dim=1)
    sims = (qn.double() @ dn.double().T)
    out = []
    for i in range(len(q)):
        order = [int(j) for j in torch.argsort(-sims[i], stable=True) if int(j) not in pos_idx[i].tolist()][:k]
        out.append(order + [-1] * (k - len(order)))
    return out


def test_negatives_are_the_index_top_k_minus_positives_and_the_doc_tower_is_frozen():
    torch.manual_seed(0)
    module = ADOREModule(CharBagEncoder(0), CLIPLoss(symmetric=False), doc_encoder=CharBagEncoder(1), num_negatives=3, optimizer=sgd)
    doc_before = [p.detach().clone() for p in module.doc_encoder.parameters()]
    stored = corpus_embeddings(CharBagEncoder(1))
    query_tower = module.query_encoder
    cap = fit(module, datamodule())
    assert len(cap.negs) == 2
    torch.testing.assert_close(module.corpus_embeddings, stored)  # indexed once, with the frozen tower
    assert all(g is None for grads in cap.doc_grads for g in grads)  # no gradient reaches the document tower
    assert all(torch.equal(a, b) for a, b in zip(doc_before, module.doc_encoder.parameters()))
    assert not module.doc_encoder.training and all(not p.requires_grad for p in module.doc_encoder.parameters())
    # the last step's negatives, from the query tower as it was at that step: check with the current one on step 1's batch
    batch = cap.batches[-1]
    with torch.no_grad():
        q = query_tower({"input_ids": batch["query_input_ids"], "attention_mask": batch["query_attention_mask"]})
    assert module.retrieve(q, batch["pos_idx"]).tolist() == brute_force_negatives(q, stored, batch["pos_idx"], 3)


def test_the_first_step_loss_is_infonce_over_in_batch_positives_and_retrieved_negatives():
    torch.manual_seed(0)
    enc = CharBagEncoder(0)
    initial = {k: v.clone() for k, v in enc.state_dict().items()}
    module = ADOREModule(enc, CLIPLoss(symmetric=False), num_negatives=2, optimizer=sgd, temperature=0.1)
    cap = fit(module, datamodule(), steps=1)
    fresh = CharBagEncoder(0)
    fresh.load_state_dict(initial)
    stored = corpus_embeddings(fresh)  # doc_encoder=None: a frozen copy of the initial query tower
    torch.testing.assert_close(module.corpus_embeddings, stored)
    batch, negs = cap.batches[0], cap.negs[0]
    with torch.no_grad():
        q = fresh({"input_ids": batch["query_input_ids"], "attention_mask": batch["query_attention_mask"]})
    assert negs.tolist() == brute_force_negatives(q, stored, batch["pos_idx"], 2)
    ids = batch["doc_idx"].tolist() + [n for row in negs.tolist() for n in row]
    refs = stored[torch.tensor([max(i, 0) for i in ids])]
    total = 0.0
    for i in range(len(q)):  # InfoNCE with every known positive of the row against the row's negatives (empty slots dropped)
        logits = (q[i].double() @ refs.double().T) / 0.1
        positives = set(batch["pos_idx"][i].tolist()) - {-1}
        pos = [j for j, d in enumerate(ids) if d in positives]
        neg = [j for j, d in enumerate(ids) if d >= 0 and d not in positives]
        total += sum(-(logits[p] - torch.logsumexp(logits[[p] + neg], 0)) for p in pos) / len(pos)
    assert cap.losses[0] == pytest.approx(float(total / len(q)), rel=1e-4, abs=1e-5)


def test_any_loss_and_a_saved_embeddings_file(tmp_path):
    stored = corpus_embeddings(CharBagEncoder(1)).numpy()
    path = tmp_path / "corpus.npy"
    np.save(path, stored)
    module = ADOREModule(CharBagEncoder(0), TripletMarginLoss(margin=0.2), doc_encoder=CharBagEncoder(5), num_negatives=2,
                         corpus_embeddings=str(path), optimizer=sgd)
    fit(module, datamodule(), steps=1)
    np.testing.assert_array_equal(module.corpus_embeddings.numpy(), stored)  # the file, not the (different) tower
    with pytest.raises(FileNotFoundError, match="corpus_embeddings="):
        ADOREModule(CharBagEncoder(0), CLIPLoss(), corpus_embeddings=str(tmp_path / "missing.npy"))
    np.save(tmp_path / "short.npy", stored[:5])
    bad = ADOREModule(CharBagEncoder(0), CLIPLoss(), doc_encoder=CharBagEncoder(1), corpus_embeddings=str(tmp_path / "short.npy"))
    with pytest.raises(ValueError, match=r"expected\s+\[16, D\]"):
        fit(bad, datamodule(), steps=1)
    enc = CharBagEncoder(0)
    with pytest.raises(ValueError, match="must be a separate module"):
        ADOREModule(enc, CLIPLoss(), doc_encoder=enc)

"""``ANNRefresh``: the refreshed candidates are a brute-force top-k of the current model without positives
(with the positive scores), the schedule (first epoch from the file, then refreshed), the logged numbers,
2 gloo DDP processes ending with the candidates of one process, and WordNet with MiniLM on a subset."""

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.query_doc import QueryDocData
from experiments.callbacks.ann_refresh import ANNRefresh
from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, TinyQueryDoc, char_tokenizer, usable
from tests.helpers import require_path
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, sgd0


def tiny_dm(**kwargs):
    return TinyQueryDoc(batch_size=4, num_negatives=2, num_workers=0, seed=3, data_config={"tokenizer": char_tokenizer, "max_length": 48}, **kwargs)


def trainer(devices=1, **kwargs):
    return L.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                     limit_val_batches=0, **kwargs)


def fit(module, dm, callbacks, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(callbacks=callbacks, **kwargs).fit(module, datamodule=dm)


def brute_force(q, d, qrels, top_k, skip_top=0, cosine=True):
    """Per query: the top ``top_k`` non-positive rows after ``skip_top`` by a full sort, their scores, the lowest positive score."""
    if cosine:
        q, d = q / np.linalg.norm(q, axis=1, keepdims=True), d / np.linalg.norm(d, axis=1, keepdims=True)
    sims = q.astype(np.float64) @ d.astype(np.float64).T
    rows, scores, pos = [], [], []
    for i, rel in enumerate(qrels):
        order = [int(j) for j in np.argsort(-sims[i], kind="stable") if int(j) not in rel][skip_top : skip_top + top_k]
        rows.append(order)
        scores.append(sims[i, order])
        pos.append(sims[i, list(rel)].min())
    return rows, scores, np.array(pos)


def embeddings(module, queries, corpus):
    with torch.no_grad():
        module.eval()
        return module.query_encoder(char_tokenizer(list(queries), 48)).numpy(), module.documents(char_tokenizer(list(corpus), 48)).numpy()


class KeepStore(L.Callback):
    """Saves this rank's stored candidates of the newest version when training ends."""

    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        store = trainer.datamodule.candidate_store
        data = {k: np.asarray(v) for k, v in store.load(store.version).items()}
        np.savez(f"{self.out}.rank{trainer.global_rank}.npz", version=store.version, **data)


def test_untrained_refresh_is_the_brute_force_top_k_without_positives(tmp_path):
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    dm = tiny_dm()
    refresh = ANNRefresh(top_k=4, skip_top=1, every_n_epochs=None, first="untrained")
    fit(module, dm, [refresh, KeepStore(str(tmp_path / "one"))], max_steps=1)
    got = np.load(tmp_path / "one.rank0.npz")
    q, d = embeddings(module, TRAIN_Q, CORPUS)
    rows, scores, pos = brute_force(q, d, TRAIN_QRELS, top_k=4, skip_top=1)
    assert int(got["version"]) == 1 and got["rows"].shape == (len(TRAIN_Q), 4)
    for i in range(len(TRAIN_Q)):
        assert got["rows"][i].tolist() == rows[i]
        np.testing.assert_allclose(got["scores"][i], scores[i], atol=1e-5)
    np.testing.assert_allclose(got["pos_scores"], pos, atol=1e-5)
    # the positives among the top skip_top + top_k retrieved, counted by brute force
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    top = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    frac = sum(int(j) in rel for row, rel in zip(top, TRAIN_QRELS) for j in row) / top.size
    (stats,) = refresh.history
    assert stats["train/ann_positive_fraction"] == pytest.approx(frac)
    assert stats["train/ann_refresh_seconds"] >= stats["train/ann_mining_seconds"] > 0


class EpochNegatives(L.Callback):
    def __init__(self):
        self.negs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.negs.setdefault(trainer.current_epoch, []).append((batch["query_idx"].tolist(), batch["neg_idx"].tolist()))


def test_first_from_file_then_refreshed_every_epoch_and_logged():
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    dm = tiny_dm()
    refresh, seen = ANNRefresh(top_k=3, every_n_epochs=1, first="file"), EpochNegatives()
    logged = []

    class Logged(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            logged.append(dict(trainer.callback_metrics))

    fit(module, dm, [refresh, seen, Logged()], max_epochs=3)
    assert len(refresh.history) == 2 and dm.candidate_store.version == 2  # epochs 1 and 2, not 0
    assert "train/ann_refresh_seconds" in logged[1] and "train/ann_positive_fraction" in logged[2]
    q, d = embeddings(module, TRAIN_Q, CORPUS)
    rows, _, _ = brute_force(q, d, TRAIN_QRELS, top_k=3)
    static = {q: usable(q) for q in range(len(TRAIN_Q))}
    for epoch, allowed in ((0, static), (2, dict(enumerate(rows)))):
        for queries, negs in seen.negs[epoch]:
            for qi, ni in zip(queries, negs):
                assert set(ni) - {-1} <= set(allowed[qi])


def test_every_n_steps_refreshes_mid_epoch():
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    dm = TinyQueryDoc(batch_size=2, num_negatives=1, num_workers=0, seed=3)
    refresh, seen = ANNRefresh(top_k=3, every_n_epochs=None, every_n_steps=2, first="file"), EpochNegatives()
    fit(module, dm, [refresh, seen], max_steps=4)
    assert [h["step"] for h in refresh.history] == [2.0, 4.0] and dm.candidate_store.version == 2
    q, d = embeddings(module, TRAIN_Q, CORPUS)
    rows, _, _ = brute_force(q, d, TRAIN_QRELS, top_k=3)
    # without workers the loader has fetched one batch ahead: the 4th batch is the first from the refreshed lists
    queries, negs = seen.negs[0][3]
    assert all(set(n) - {-1} <= set(rows[qi]) for qi, n in zip(queries, negs))


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="never refresh"):
        ANNRefresh(every_n_epochs=None, first="file")
    with pytest.raises(ValueError, match="first must be one of"):
        ANNRefresh(first="bm25")
    with pytest.raises(ValueError, match="max_queries must be a positive integer"):
        ANNRefresh(max_queries=0)


def run(tmp_path, devices):
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    out = str(tmp_path / f"dev{devices}")
    fit(module, tiny_dm(), [ANNRefresh(top_k=5, every_n_epochs=None, first="untrained", max_queries=7), KeepStore(out)], devices=devices,
        max_steps=1)
    return out


@pytest.mark.slow
def test_ddp_ranks_end_with_the_candidates_of_one_process(tmp_path):
    single, ddp = run(tmp_path, 1), run(tmp_path, 2)
    ref = np.load(f"{single}.rank0.npz")
    for rank in (0, 1):
        got = np.load(f"{ddp}.rank{rank}.npz")
        assert got["rows"].tolist() == ref["rows"].tolist()
        np.testing.assert_allclose(got["scores"], ref["scores"], atol=1e-5)
        np.testing.assert_allclose(got["pos_scores"], ref["pos_scores"], atol=1e-5, equal_nan=True)


# --------------------------------------------------------------------------------- WordNet + MiniLM
class SmallWordNet:
    """WordNet glosses cut to the first ``n_docs`` corpus rows (train queries whose synset falls inside), for speed."""

    @staticmethod
    def make(n_docs, **kwargs):
        from datamodules.wordnet import WordNetGlossDataModule

        class Cut(WordNetGlossDataModule):
            def load_query_doc(self):
                from datamodules.query_doc import QueryDocSplit

                full = super().load_query_doc()
                keep = [i for i, rel in enumerate(full.train.qrels) if max(rel) < n_docs][:200]
                train = QueryDocSplit([full.train.queries[i] for i in keep], [list(full.train.qrels[i]) for i in keep])
                return QueryDocData(list(full.corpus[:n_docs]), train, None, train, negatives=None)

        return Cut(**kwargs)


@pytest.mark.slow
def test_wordnet_minilm_refresh_of_a_query_subset_matches_brute_force():
    from datamodules.wordnet import DEBIAN_ROOT

    require_path(DEBIAN_ROOT, "WordNet 3.0 (Debian wordnet-base)")
    from models import create_encoder

    encoder = create_encoder("minilm-l6")
    module = DualEncoderModule(encoder, CLIPLoss(symmetric=False), optimizer=sgd0)
    dm = SmallWordNet.make(240, num_negatives=2, dynamic_candidates=True, batch_size=8, num_workers=0, eval_batch_size=128)
    dm.trainer = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dm.data_config = encoder.data_config
        dm.setup("fit")

    class FakeTrainer:
        datamodule, current_epoch, global_step, world_size, loggers, is_global_zero = dm, 0, 0, 1, [], True

    refresh = ANNRefresh(top_k=10, max_queries=16, first="untrained")
    stats = refresh.refresh(FakeTrainer(), module)
    subset = np.sort(np.random.default_rng(0).choice(len(dm.data.train.queries), size=16, replace=False))
    stored = dm.candidate_store.load(dm.candidate_store.version)
    cfg = dm.resolved_data_config()
    q = encoder.encode([dm.data.train.queries[int(i)] for i in subset], prefix=cfg.get("query_prefix") or None).numpy()
    d = encoder.encode(list(dm.data.corpus), batch_size=128, prefix=cfg.get("doc_prefix") or None).numpy()
    rows, scores, pos = brute_force(q, d, [dm.data.train.qrels[int(i)] for i in subset], top_k=10)
    for j, qi in enumerate(subset):
        assert stored["rows"][qi].tolist() == rows[j]
        np.testing.assert_allclose(stored["scores"][qi], scores[j], atol=1e-4)
    np.testing.assert_allclose(stored["pos_scores"][subset], pos, atol=1e-4)
    others = np.setdiff1d(np.arange(len(dm.data.train.queries)), subset)
    assert (stored["rows"][others] == -1).all()  # not refreshed, no static candidates
    assert math.isfinite(stats["train/ann_refresh_seconds"]) and 0 <= stats["train/ann_positive_fraction"] <= 1

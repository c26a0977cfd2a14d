"""``ANNRefresh``: the refreshed candidates are a brute-force top-k of the current model without positives
(with the positive scores), the schedule (first epoch from the file, then refreshed), the logged numbers,
2 gloo DDP processes ending with the candidates of one process, and WordNet with MiniLM on a subset."""

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from datamodules.query_doc_data import QueryDocData
from experiments.callbacks.ann_refresh import ANNRefresh
from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import CLIPLoss
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, TinyQueryDoc, char_tokenizer, usable
from tests.helpers import require_path, sgd
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


def test_epoch_queries_are_the_rows_the_epoch_draws_with_the_lists_of_a_full_refresh(tmp_path):
    torch.manual_seed(0)
    dm = TinyQueryDoc(batch_size=2, num_negatives=1, num_workers=0, seed=5, num_batches=2)  # 4 of the 8 train queries per epoch
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0)
    refresh, seen = ANNRefresh(top_k=3, every_n_epochs=1, first="untrained", queries="epoch"), EpochNegatives()
    fit(module, dm, [refresh, seen, KeepStore(str(tmp_path / "epoch"))], max_epochs=2)
    drawn = {e: sorted({q for queries, _ in seen.negs[e] for q in queries}) for e in (0, 1)}
    assert [h["queries"] for h in refresh.history] == [len(drawn[0]), len(drawn[1])] and len(drawn[0]) < len(TRAIN_Q)
    q, d = embeddings(module, TRAIN_Q, CORPUS)
    rows, _, _ = brute_force(q, d, TRAIN_QRELS, top_k=3)
    got = np.load(tmp_path / "epoch.rank0.npz")["rows"]
    for qi in drawn[1]:  # the lists of the queries epoch 1 draws are those of a full refresh by the same model (lr 0)
        assert got[qi, :3].tolist() == rows[qi] and (got[qi, 3:] == -1).all()  # the store is as wide as the static lists
    for queries, negs in seen.negs[1]:
        assert all(set(n) - {-1} <= set(rows[qi]) for qi, n in zip(queries, negs))
    with pytest.raises(ValueError, match="every_n_steps"):
        ANNRefresh(every_n_steps=5, queries="epoch")
    with pytest.raises(ValueError, match="queries must be one of"):
        ANNRefresh(queries="some")


def test_corpus_cache_reuses_the_initial_towers_embeddings_only(tmp_path, monkeypatch):
    import experiments.callbacks.ann_refresh as ann

    calls = []
    real = ann._encode
    monkeypatch.setattr(ann, "_encode", lambda enc, texts, *a: calls.append(len(texts)) or real(enc, texts, *a))

    def one_run(tag):  # trained (lr 0.5): the epoch-1 tower differs from the initial one
        torch.manual_seed(0)
        module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd)
        fit(module, tiny_dm(), [ANNRefresh(top_k=3, every_n_epochs=1, first="untrained", corpus_cache=str(tmp_path / "cache")),
                                KeepStore(str(tmp_path / tag))], max_epochs=2)
        return np.load(tmp_path / f"{tag}.rank0.npz")

    first = one_run("a")
    n_docs = len(CORPUS)
    assert calls.count(n_docs) == 2 and len(list((tmp_path / "cache").glob("corpus-*.npy"))) == 1  # fit start written, epoch 1 not
    calls.clear()
    second = one_run("b")
    assert calls.count(n_docs) == 1  # the fit-start corpus read back; epoch 1's (step > 0) encoded again
    assert second["rows"].tolist() == first["rows"].tolist()
    np.testing.assert_allclose(second["scores"], first["scores"], atol=1e-6)
    calls.clear()
    # another initial tower: another fingerprint, a miss
    module = DualEncoderModule(CharBagEncoder(seed=1), CLIPLoss(symmetric=False), optimizer=sgd0)
    fit(module, tiny_dm(), [ANNRefresh(top_k=3, every_n_epochs=None, first="untrained", corpus_cache=str(tmp_path / "cache"))], max_steps=1)
    assert calls.count(n_docs) == 1 and len(list((tmp_path / "cache").glob("corpus-*.npy"))) == 2


def test_a_resumed_run_refreshes_with_the_restored_model_for_the_restored_epoch(tmp_path):
    torch.manual_seed(0)
    module = DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd)
    refresh = ANNRefresh(top_k=3, every_n_epochs=3, first="untrained")
    t = trainer(callbacks=[refresh], max_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(module, datamodule=tiny_dm())
    t.save_checkpoint(tmp_path / "epoch0.ckpt")
    steps = t.global_step
    q, d = embeddings(module, TRAIN_Q, CORPUS)  # the model of the checkpoint
    rows, _, _ = brute_force(q, d, TRAIN_QRELS, top_k=3)

    resumed, seen = ANNRefresh(top_k=3, every_n_epochs=3, first="untrained"), EpochNegatives()
    module2 = DualEncoderModule(CharBagEncoder(seed=7), CLIPLoss(symmetric=False), optimizer=sgd0)  # weights come from the checkpoint
    dm = tiny_dm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(callbacks=[resumed, seen], max_epochs=2).fit(module2, datamodule=dm, ckpt_path=tmp_path / "epoch0.ckpt")
    # the history came back with the checkpoint; one refresh at train start, for epoch 1, with the restored weights
    assert len(resumed.history) == 2 and (resumed.history[1]["epoch"], resumed.history[1]["step"]) == (1.0, float(steps))
    assert dm.candidate_store.version == 1
    for queries, negs in seen.negs[1]:
        assert all(set(n) - {-1} <= set(rows[qi]) for qi, n in zip(queries, negs))

    # first="file" and no refresh before the checkpoint: the static lists are still the right ones, nothing is refreshed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trainer(callbacks=[ANNRefresh(top_k=3, every_n_epochs=3, first="file")], max_epochs=1)
        t.fit(DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd), datamodule=tiny_dm())
        t.save_checkpoint(tmp_path / "static.ckpt")
        static, dm = ANNRefresh(top_k=3, every_n_epochs=3, first="file"), tiny_dm()
        trainer(callbacks=[static], max_epochs=2).fit(DualEncoderModule(CharBagEncoder(), CLIPLoss(symmetric=False), optimizer=sgd0),
                                                      datamodule=dm, ckpt_path=tmp_path / "static.ckpt")
    assert static.history == [] and dm.candidate_store.version == 0

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
                from datamodules.query_doc_data import QueryDocSplit

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

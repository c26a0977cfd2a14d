"""``NGAMEMemoryBank`` with ``NGAMEBatchSampler``: the bank filled from the step's outputs equals the
embeddings of the rows (query side, and the positive documents inside ``[memory; positives; negatives]``),
a short fit on the tiny query/document data re-clusters on schedule and trains on unions of whole
clusters, and under DDP (2 gloo processes) both ranks hold the same bank and their samplers the same
global batches, each rank a disjoint shard of it."""

import functools
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from contracts.distances import CosineSimilarity
from datamodules.ngame import NGAMEBatchSampler, balanced_kmeans
from datamodules.query_doc_train import EpochBatchSampler
from experiments.callbacks.ngame import NGAMEMemoryBank, find_batch_sampler
from lightning_modules.dual_encoder_module import DualEncoderModule
from losses import TripletMarginLoss
from miners import HardNegativeTopKMiner
from tests.datamodules.test_query_doc import CORPUS, TRAIN_Q, TRAIN_QRELS, TinyQueryDoc, char_tokenizer
from tests.lightning_modules.test_dual_encoder_module import CharBagEncoder, sgd, sgd0

N = len(TRAIN_Q)  # 8 train queries


class FakeStep:
    gather = "global"


class FakeModule:
    step = FakeStep()


def test_query_side_stores_the_step_embeddings_by_row():
    bank = NGAMEMemoryBank()
    emb = torch.randn(4, 3)
    rows, values = bank.rows_and_embeddings(FakeModule(), {"emb": emb, "ref_emb": None}, {"query_idx": torch.tensor([5, 1, 7, 2])})
    bank.store(rows, values, 10)
    expected = torch.zeros(10, 3)
    expected[[5, 1, 7, 2]] = emb
    assert torch.equal(bank.bank, expected) and bank.seen.tolist() == [i in (5, 1, 7, 2) for i in range(10)]
    later = torch.randn(2, 3)
    bank.store(torch.tensor([1, 9]), later, 10)  # a row seen again keeps its latest value
    assert torch.equal(bank.bank[1], later[0]) and torch.equal(bank.bank[5], emb[0]) and bool(bank.seen[9])


def test_positive_side_reads_the_positives_between_memory_and_negatives():
    memory, positives, negatives = torch.randn(3, 4), torch.randn(4, 4), torch.randn(8, 4)
    outputs = {"emb": torch.randn(4, 4), "ref_emb": torch.cat([memory, positives, negatives])}
    batch = {"query_idx": torch.tensor([0, 3, 2, 6]), "neg_idx": torch.zeros(4, 2, dtype=torch.long), "neg_input_ids": torch.zeros(8, 5)}
    bank = NGAMEMemoryBank(side="positive")
    rows, values = bank.rows_and_embeddings(FakeModule(), outputs, batch)
    assert rows.tolist() == [0, 3, 2, 6] and torch.equal(values, positives)
    without_negs = {"emb": outputs["emb"], "ref_emb": torch.cat([memory, positives])}
    assert torch.equal(bank.rows_and_embeddings(FakeModule(), without_negs, {"query_idx": batch["query_idx"]})[1], positives)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="side='doc'; expected one of"):
        NGAMEMemoryBank(side="doc")
    bank = NGAMEMemoryBank()
    with pytest.raises(KeyError, match="no 'query_idx'"):
        bank.rows_and_embeddings(FakeModule(), {"emb": torch.randn(2, 3)}, {"label": torch.tensor([0, 1])})
    with pytest.raises(TypeError, match="outputs dict"):
        bank.rows_and_embeddings(FakeModule(), torch.tensor(1.0), {"query_idx": torch.tensor([0])})
    with pytest.raises(ValueError, match="3 embeddings for 2 rows"):
        bank.rows_and_embeddings(FakeModule(), {"emb": torch.randn(3, 3)}, {"query_idx": torch.tensor([0, 1])})
    with pytest.raises(ValueError, match="needs the step's ref_emb"):
        NGAMEMemoryBank(side="positive").rows_and_embeddings(FakeModule(), {"emb": torch.randn(2, 3), "ref_emb": None}, {"query_idx": torch.tensor([0, 1])})
    bank.store(torch.tensor([0]), torch.randn(1, 3), 4)
    with pytest.raises(ValueError, match="outside the bank of 4"):
        bank.store(torch.tensor([4]), torch.randn(1, 3), 4)


def test_epoch_start_hands_the_bank_through_the_epoch_wrapper_and_restores_from_a_checkpoint():
    """A resumed run (bank from the checkpoint state, a fresh sampler without clusters) re-clusters at once."""
    sampler = NGAMEBatchSampler(np.arange(8), 4, cluster_size=2, warmup_epochs=1, recluster_every=5)
    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(batch_sampler=EpochBatchSampler(sampler)), current_epoch=3)
    empty = NGAMEMemoryBank()
    assert find_batch_sampler(trainer) is sampler
    with pytest.raises(RuntimeError, match="memory bank is empty"):
        empty.on_train_epoch_start(trainer, None)
    filled = NGAMEMemoryBank()
    filled.store(torch.arange(8), torch.randn(8, 5), 8)
    resumed = NGAMEMemoryBank()
    resumed.load_state_dict(filled.state_dict())
    assert torch.equal(resumed.bank, filled.bank) and torch.equal(resumed.seen, filled.seen)
    sampler.set_epoch(3)  # not a re-clustering epoch (1, 6, ...), but no clusters yet
    assert sampler.needs_embeddings(3)
    resumed.on_train_epoch_start(trainer, None)
    batches = list(trainer.train_dataloader.batch_sampler)
    assert sampler.clustered_epoch == 3 and len(batches) == 2 and all(whole_clusters([i for i, _ in b], [c.tolist() for c in sampler.clusters])
                                                                     for b in batches)
    assert NGAMEMemoryBank(side="positive").state_key != NGAMEMemoryBank().state_key  # two banks checkpoint side by side


# ----------------------------------------------------------------------------------- fits
class Record(L.Callback):
    """Per epoch: this rank's train rows per batch, the sampler's global batches and clusters; the bank at the end."""

    def __init__(self, out=None):
        self.out, self.batches, self.global_batches, self.clusters = out, {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.setdefault(trainer.current_epoch, []).append(batch["query_idx"].tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        sampler = find_batch_sampler(trainer)
        epoch = trainer.current_epoch
        if sampler.clusters is not None and epoch >= sampler.warmup_epochs:
            self.clusters[epoch] = [c.tolist() for c in sampler.clusters]
            self.global_batches[epoch] = [b.tolist() for b in sampler.global_batches(epoch)]

    def on_train_end(self, trainer, pl_module):
        if self.out is not None:
            banks = {c.side: c for c in trainer.callbacks if isinstance(c, NGAMEMemoryBank)}
            torch.save({"batches": self.batches, "global": self.global_batches, "clusters": self.clusters, "bank": banks["query"].bank,
                        "seen": banks["query"].seen, "positive_bank": banks["positive"].bank if "positive" in banks else None},
                       f"{self.out}.rank{trainer.global_rank}")


def ngame_datamodule(batch_size=4, **sampler_kwargs):
    kwargs = {"cluster_size": 2, "warmup_epochs": 1, "recluster_every": 1, **sampler_kwargs}
    factory = functools.partial(NGAMEBatchSampler, batch_size=batch_size, **kwargs)
    return TinyQueryDoc(num_negatives=2, num_workers=0, seed=3, batch_sampler=factory)


def ngame_module(optimizer):
    distance = CosineSimilarity()
    return DualEncoderModule(CharBagEncoder(), TripletMarginLoss(margin=0.3), miner=HardNegativeTopKMiner(k=10), distance=distance, optimizer=optimizer)


def fit(module, dm, epochs, callbacks, devices=1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        L.Trainer(
            accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_epochs=epochs, limit_val_batches=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
            num_sanity_val_steps=0, callbacks=callbacks,
        ).fit(module, datamodule=dm)


def whole_clusters(batch, clusters):
    members = [set(c) for c in clusters]
    return all(c <= set(batch) or not (c & set(batch)) for c in members) and sum(len(c) for c in members if c & set(batch)) == len(batch)


def test_bank_equals_the_encoder_embeddings_of_the_rows_and_clusters_are_made_from_it():
    """lr 0: the encoder never changes, so the bank must hold exactly the query tower's embedding of every row."""
    module, bank, record = ngame_module(sgd0), NGAMEMemoryBank(), Record()
    fit(module, ngame_datamodule(), 2, [bank, record])
    encoder = module.query_encoder.eval()
    with torch.no_grad():
        expected = encoder(char_tokenizer(list(TRAIN_Q), 48))
    assert bool(bank.seen.all())  # 2 batches of 4 cover the 8 queries every epoch
    torch.testing.assert_close(bank.bank, expected, rtol=1e-5, atol=1e-6)
    sampler = bank.sampler
    assert isinstance(sampler, NGAMEBatchSampler) and sampler.clustered_epoch == 1
    # epoch 1's clusters are balanced_kmeans of the bank handed at its start (epoch 0's embeddings: equal, lr 0)
    seed = int(np.random.default_rng([sampler.seed, 1]).integers(2**62))
    assert [c.tolist() for c in balanced_kmeans(expected, 4, seed=seed)] == record.clusters[1]
    assert all(whole_clusters(b, record.clusters[1]) for b in record.batches[1])
    assert record.batches[1] == record.global_batches[1]


def test_three_epochs_recluster_on_schedule_and_train_on_whole_clusters():
    module, bank, record = ngame_module(sgd), NGAMEMemoryBank(), Record()
    before = [p.detach().clone() for p in module.parameters()]
    fit(module, ngame_datamodule(cluster_size_schedule=[2]), 3, [bank, record])
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert sorted(record.batches) == [0, 1, 2] and all(len(b) == 2 for b in record.batches.values())
    assert sorted(map(len, record.clusters[1])) == [2, 2, 2, 2]  # cluster size 2 from epoch 1
    assert sorted(map(len, record.clusters[2])) == [4, 4]  # doubled at epoch 2: one cluster per batch
    assert bank.sampler.clustered_epoch == 2
    for epoch in (1, 2):
        assert all(whole_clusters(b, record.clusters[epoch]) for b in record.batches[epoch])
    assert sorted(record.batches[2][0] + record.batches[2][1]) == list(range(N))


@pytest.mark.slow
def test_ddp_ranks_hold_the_same_bank_and_the_same_global_batches(tmp_path):
    """2 gloo processes, lr 0: both banks (queries, positives) equal the encoder's embeddings on both ranks,
    the ranks cluster alike, and their batches are disjoint shards of the same global batches of whole clusters."""
    out = str(tmp_path / "ngame")
    module = ngame_module(sgd0)
    fit(module, ngame_datamodule(batch_size=2), 3, [NGAMEMemoryBank(), NGAMEMemoryBank(side="positive", feed_sampler=False), Record(out)], devices=2)
    ranks = [torch.load(f"{out}.rank{r}", weights_only=False) for r in (0, 1)]
    with torch.no_grad():
        queries = module.query_encoder.eval()(char_tokenizer(list(TRAIN_Q), 48))
        docs = module.query_encoder(char_tokenizer(list(CORPUS), 48))
    for rank in ranks:
        assert bool(rank["seen"].all())
        torch.testing.assert_close(rank["bank"], queries, rtol=1e-5, atol=1e-6)
        for row, positives in enumerate(TRAIN_QRELS):  # the positive drawn last for the row: one of its qrels
            assert min(float((rank["positive_bank"][row] - docs[d]).abs().max()) for d in positives) < 1e-5
    assert torch.equal(ranks[0]["positive_bank"], ranks[1]["positive_bank"])
    assert ranks[0]["clusters"] == ranks[1]["clusters"] and sorted(ranks[0]["clusters"]) == [1, 2]
    assert ranks[0]["global"] == ranks[1]["global"]
    for epoch in (1, 2):
        clusters = ranks[0]["clusters"][epoch]
        assert sorted(map(len, clusters)) == [2, 2, 2, 2]
        for b, global_batch in enumerate(ranks[0]["global"][epoch]):
            shard0, shard1 = ranks[0]["batches"][epoch][b], ranks[1]["batches"][epoch][b]
            assert not set(shard0) & set(shard1) and shard0 + shard1 == global_batch
            assert whole_clusters(global_batch, clusters)


# ------------------------------------------------------------------------------ the fragment
TINY_TEXT = {
    "seed_everything": 0,
    "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_val_batches": 0, "logger": False},
    "model": {
        "class_path": "lightning_modules.DualEncoderModule",
        "init_args": {
            "query_encoder": {"class_path": "tests.lightning_modules.test_dual_encoder_module.CharBagEncoder"},
            "loss": {"class_path": "losses.CLIPLoss", "init_args": {"symmetric": False}},
            "eval_ks": [1, 5],
        },
    },
    "data": {"class_path": "tests.datamodules.test_query_doc.TinyQueryDoc", "init_args": {"batch_size": 4, "num_workers": 0}},
}


@pytest.mark.slow
def test_the_fragment_runs_three_epochs_through_the_cli(tmp_path):
    """``experiments/mining/ngame.yaml`` on a seconds-long text config: sampler, bank, miner, loss and distance as promised."""
    from pathlib import Path

    import yaml

    from tests.helpers import run_cli

    base = tmp_path / "tiny_text.yaml"
    base.write_text(yaml.safe_dump(TINY_TEXT))
    fragment = Path(__file__).resolve().parents[2] / "experiments" / "mining" / "ngame.yaml"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = run_cli(["fit", "--config", str(base), "--config", str(fragment), f"--trainer.default_root_dir={tmp_path}",
                           "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
                           "--data.init_args.batch_sampler.init_args.batch_size=4", "--data.init_args.batch_sampler.init_args.num_batches=2"])
    module, bank = trainer.lightning_module, next(c for c in trainer.callbacks if isinstance(c, NGAMEMemoryBank))
    assert trainer.current_epoch == 3 and isinstance(module.miner, HardNegativeTopKMiner) and module.miner.k == 10
    assert isinstance(module.step.loss, TripletMarginLoss) and module.step.loss.margin == 0.3
    assert isinstance(module.step.loss.distance, CosineSimilarity) and isinstance(module.miner.distance, CosineSimilarity)
    sampler = bank.sampler
    assert isinstance(sampler, NGAMEBatchSampler) and sampler.clustered_epoch == 2 and bool(bank.seen.all())
    assert sorted(map(len, sampler.clusters)) == [4, 4]  # cluster size 8 capped at the global batch of 4

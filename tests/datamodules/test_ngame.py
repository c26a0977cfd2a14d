"""``NGAMEBatchSampler`` and ``balanced_kmeans``: balanced clusters (sizes within one) that beat a random
partition on within-cluster similarity, random warm-up batches equal to ``RandomBatchSampler``'s, batches
that are unions of whole clusters after clustering, the cluster-size schedule, DDP shards that are
disjoint and make up the global batch, and the errors."""

import itertools

import numpy as np
import pytest
import torch

from datamodules.ngame import NGAMEBatchSampler, balanced_kmeans, cluster_sizes
from datamodules.samplers import RandomBatchSampler


def blobs(n_blobs=8, per_blob=16, dim=12, spread=0.15, seed=0):
    """Points around ``n_blobs`` random unit directions, with their blob ids, shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_blobs, dim, generator=g), dim=1)
    labels = torch.arange(n_blobs).repeat_interleave(per_blob)
    x = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return x[perm], labels[perm].numpy()


def within_similarity(x, clusters):
    """Brute force: the mean cosine similarity over the pairs of distinct points of a cluster."""
    x = torch.nn.functional.normalize(x.double(), dim=1)
    total, pairs = 0.0, 0
    for c in clusters:
        for i, j in itertools.combinations(c.tolist(), 2):
            total += float(x[i] @ x[j])
            pairs += 1
    return total / pairs


def assert_partition(clusters, n):
    flat = np.concatenate(clusters)
    assert sorted(flat.tolist()) == list(range(n))


@pytest.mark.parametrize("n,k", [(103, 10), (128, 8), (50, 7), (9, 9), (5, 1)])
def test_balanced_kmeans_is_a_balanced_partition(n, k):
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(n))
    clusters = balanced_kmeans(x, k, seed=1)
    assert len(clusters) == k
    assert_partition(clusters, n)
    sizes = sorted(len(c) for c in clusters)
    assert sizes[-1] - sizes[0] <= 1 and sizes == sorted(cluster_sizes(n, k).tolist())
    again = balanced_kmeans(x.numpy(), k, seed=1)  # deterministic per seed, tensor or array
    assert all(np.array_equal(a, b) for a, b in zip(clusters, again))


def test_balanced_kmeans_beats_a_random_partition_and_finds_separated_blobs():
    x, labels = blobs()
    clusters = balanced_kmeans(x, 8, seed=0)
    rng = np.random.default_rng(0)
    random_sims = []
    for _ in range(5):
        perm = rng.permutation(len(x))
        random_sims.append(within_similarity(x, np.array_split(perm, 8)))
    ours = within_similarity(x, clusters)
    assert ours > max(random_sims) + 0.3
    purity = sum(np.bincount(labels[c]).max() for c in clusters) / len(x)
    assert purity >= 0.9
    # fewer clusters than blobs: still balanced and better than random
    coarse = balanced_kmeans(x, 3, seed=0)
    assert sorted(len(c) for c in coarse) == [42, 43, 43]
    assert within_similarity(x, coarse) > max(random_sims)


def test_balanced_kmeans_errors():
    with pytest.raises(ValueError, match="num_clusters=11 must be in 1..10"):
        balanced_kmeans(torch.randn(10, 3), 11)
    with pytest.raises(ValueError, match=r"expected \[N, D\]"):
        balanced_kmeans(np.zeros((2, 3, 4), dtype=np.float32), 1)


def sampler(n=64, batch_size=8, **kwargs):
    kwargs = {"cluster_size": 4, "warmup_epochs": 1, "recluster_every": 1, **kwargs}
    return NGAMEBatchSampler(np.arange(n), batch_size, **kwargs)


def test_warmup_batches_are_the_random_samplers():
    for rank in (0, 1):
        s = sampler(rank=rank, world_size=2, seed=5, warmup_epochs=2)
        ref = RandomBatchSampler(np.arange(64), 8, rank=rank, world_size=2, seed=5)
        for epoch in (0, 1):
            s.set_epoch(epoch)
            ref.set_epoch(epoch)
            assert list(s) == list(ref) and len(s) == len(ref) == 4


def test_without_embeddings_a_clustering_epoch_fails_clearly():
    s = sampler()
    s.set_epoch(1)
    with pytest.raises(RuntimeError, match="NGAMEMemoryBank"):
        list(s)
    s.set_embeddings(torch.randn(64, 5))
    list(s)
    s.set_epoch(2)  # re-clusters, but no new embeddings since epoch 1
    with pytest.raises(RuntimeError, match="no new embeddings since epoch 1"):
        list(s)


def test_bad_arguments_and_embeddings():
    with pytest.raises(ValueError, match="warmup_epochs must be >= 1"):
        sampler(warmup_epochs=0)
    with pytest.raises(ValueError, match="recluster_every must be >= 1"):
        sampler(recluster_every=0)
    with pytest.raises(ValueError, match="cluster_size must be >= 1"):
        sampler(cluster_size=0)
    with pytest.raises(ValueError, match="distinct epochs"):
        sampler(cluster_size_schedule=[3, 3])
    with pytest.raises(ValueError, match="needs 128 items"):
        sampler(batch_size=64, world_size=2)
    s = sampler()
    with pytest.raises(ValueError, match=r"expected \[64, D\]"):
        s.set_embeddings(torch.randn(63, 5))
    with pytest.raises(ValueError, match=r"seen has shape \(3,\); expected \[64\]"):
        s.set_embeddings(torch.randn(64, 5), torch.ones(3, dtype=torch.bool))


def test_cluster_size_follows_the_schedule():
    s = sampler(n=96, batch_size=16, cluster_size=2, warmup_epochs=1, recluster_every=3, cluster_size_schedule=[3, 5, 6])
    sizes = [s.cluster_size_at(e) for e in range(8)]
    assert sizes == [None, 2, 2, 4, 4, 8, 16, 16]  # 16 = the global batch: the cap
    assert [e for e in range(9) if s.reclusters_at(e)] == [1, 3, 4, 5, 6, 7]  # 1 + 3j and the schedule
    emb = torch.randn(96, 6, generator=torch.Generator().manual_seed(0))
    for epoch in range(8):
        s.set_epoch(epoch)
        if s.needs_embeddings(epoch):
            s.set_embeddings(emb + 0.01 * epoch)
        batches = list(s)
        assert len(batches) == 6 and all(len(b) == 16 for b in batches)
        if epoch >= 1:
            assert s.clustered_epoch == max(e for e in range(epoch + 1) if s.reclusters_at(e))
            assert sorted(len(c) for c in s.clusters) == [sizes[s.clustered_epoch]] * (96 // sizes[s.clustered_epoch])
            assert not s.needs_embeddings(epoch)
    s.cluster_size_schedule = []  # a cap at the global batch also when cluster_size itself is larger
    s.cluster_size = 64
    assert s.cluster_size_at(9) == 16


def clusters_of_batch(batch, clusters):
    """The clusters a global batch touches, and whether it holds every member of each."""
    member = {int(i): c for c, rows in enumerate(clusters) for i in rows}
    touched = {member[int(i)] for i in batch}
    whole = sum(len(clusters[c]) for c in touched) == len(batch) and len(set(map(int, batch))) == len(batch)
    return touched, whole


@pytest.mark.parametrize("n,cluster_size", [(64, 4), (70, 4), (61, 3)])
def test_after_clustering_every_batch_is_a_union_of_whole_clusters(n, cluster_size):
    emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(1))
    s = sampler(n=n, batch_size=8, cluster_size=cluster_size, seed=2, num_batches=20)  # 20 batches: several passes
    s.set_epoch(1)
    s.set_embeddings(emb)
    batches = list(s)
    assert len(batches) == 20
    q = n // (n // cluster_size)
    per_batch = 8 // cluster_size
    for batch in batches:
        touched, whole = clusters_of_batch(batch, s.clusters)
        assert whole and len(touched) == per_batch
        assert per_batch * q <= len(batch) <= per_batch * (q + 1)
    # within a pass no cluster repeats
    per_pass = len(s.clusters) // per_batch
    firsts = [c for batch in batches[:per_pass] for c in clusters_of_batch(batch, s.clusters)[0]]
    assert len(firsts) == len(set(firsts))


def test_unseen_rows_are_still_clustered_in_balance():
    s = sampler(n=40, batch_size=8, cluster_size=4)
    seen = torch.ones(40, dtype=torch.bool)
    seen[::3] = False
    emb = torch.randn(40, 5)
    emb[~seen] = 0.0  # never written in the bank
    s.set_epoch(1)
    s.set_embeddings(emb, seen)
    list(s)
    assert_partition(s.clusters, 40)
    assert sorted(len(c) for c in s.clusters) == [4] * 10


def test_cluster_batches_are_harder_than_random_batches():
    x, labels = blobs(n_blobs=8, per_blob=16)
    s = sampler(n=128, batch_size=16, cluster_size=16, seed=0)
    s.set_epoch(1)
    s.set_embeddings(x)
    batches = list(s)
    purity = np.mean([np.bincount(labels[np.asarray(b)]).max() / len(b) for b in batches])
    assert purity >= 0.9  # a batch is (nearly) one blob: in-batch negatives come from the same neighbourhood
    s.set_epoch(0)
    random_purity = np.mean([np.bincount(labels[np.asarray(b)]).max() / len(b) for b in s])
    assert random_purity < 0.5


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_shards_are_disjoint_and_make_up_the_global_batch(world_size):
    n, per_rank = 90, 6
    emb = torch.randn(n, 7, generator=torch.Generator().manual_seed(3))
    samplers = [sampler(n=n, batch_size=per_rank, rank=r, world_size=world_size, seed=9, cluster_size=4) for r in range(world_size)]
    for s in samplers:
        s.set_epoch(1)
        s.set_embeddings(emb.clone())
    shards = [list(s) for s in samplers]
    reference = samplers[0]
    for s in samplers[1:]:  # every rank clustered the same bank the same way
        assert all(np.array_equal(a, b) for a, b in zip(s.clusters, reference.clusters))
    global_batches = list(reference.global_batches(1))
    assert len(global_batches) == len(shards[0]) == n // (per_rank * world_size)
    for b, global_batch in enumerate(global_batches):
        parts = [shards[r][b] for r in range(world_size)]
        joined = list(itertools.chain(*parts))
        assert joined == global_batch.tolist()  # rank order, contiguous shards
        assert len(set(joined)) == len(joined)  # disjoint
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert clusters_of_batch(global_batch, reference.clusters)[1]

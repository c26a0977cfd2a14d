"""NGAME mini-batches: batches made of whole clusters of similar training points, re-clustered as training goes.

Dahiya et al., "NGAME: Negative Mining-aware Mini-batching for Extreme Classification" (WSDM 2023):
in-batch negatives are only as hard as the batch is coherent, so after a warm-up of random batches
NGAME clusters the training points on their current embeddings into balanced clusters of ``C``
points and builds each mini-batch from ``B / C`` randomly chosen clusters; the in-batch hard
negatives of a point are then mostly its cluster mates. The loss is the triplet loss over the
in-batch negatives, ``sum_i sum_{n in topk(N_i)} [s(x_i, z_n) - s(x_i, z_{p_i}) + margin]_+`` with
``s`` the cosine similarity, the top 10 negatives and margin 0.3 in the paper's code
(``miners.HardNegativeTopKMiner`` + ``losses.TripletMarginLoss``; ``experiments/mining/ngame.yaml``).
The clusters come from the embeddings the training step already produced (a memory bank,
``experiments.callbacks.NGAMEMemoryBank``), so mining costs no extra encoder pass; they are
refreshed every ``R`` epochs and ``C`` doubles on a schedule (a curriculum: larger clusters,
harder negatives).

The schedule follows the paper's code (``ClusteringIndex``, configs ``sampling_curr_epochs``,
``sampling_refresh_interval``, ``sampling_init_cluster_size``):

- epochs ``< warmup_epochs``: uniformly random batches (exactly ``RandomBatchSampler``);
- the cluster size at epoch ``e`` is ``cluster_size * 2 ** #{s in cluster_size_schedule: s <= e}``
  (capped at the global batch size): the code's initial size 1 doubled at every listed epoch;
- clusters are recomputed at ``warmup_epochs + j * recluster_every`` and at every epoch of the
  schedule from ``warmup_epochs`` on (where the size changes). The paper's code re-clusters when
  ``epoch % refresh_interval == 0`` after the warm-up; with its settings (warm-up 10, refresh 5,
  doubling epochs that are multiples of 5) both rules give the same epochs;
- a batch is whole clusters: the paper's code concatenates the shuffled clusters and cuts the
  sequence into batches, so there a cluster may straddle two batches.

Here the clustered points are the train *queries* of a query/document DataModule (the sampler's
``labels`` are ``arange(num_train_queries)``): NGAME's siamese stage clusters its training
documents (the XC "queries") on their own embeddings, which is what the default memory bank holds;
the bank can instead hold each query's positive document embedding (``side="positive"``), NGAME's
label-side view.

Balanced clustering (``balanced_kmeans``) is the recursive balanced spherical 2-means that the NGAME
code calls (``cluster_balance`` with ``b_kmeans_dense`` of its XC library), the label-tree split of
Prabhu et al., "Parabel: Partitioned Label Trees for Extreme Classification with Application to
Dynamic Search Advertising" (WWW 2018), also used by DECAF (Mittal et al., WSDM 2021): every split puts the
points with the largest ``cos(x, mu_left) - cos(x, mu_right)`` on the left, exactly as many as the
left half must hold, so every final cluster has ``floor(N / K)`` or ``ceil(N / K)`` points.

DDP: every rank gets the same memory bank (the callback gathers it), clusters it with the same
seed and builds the same global schedule; each global batch (``m`` whole clusters) is cut into
``world_size`` contiguous shards (sizes differ by at most one), so ranks see disjoint shards and
the gathered global batch is a union of whole clusters. No communication in the sampler: the ranks
agree because they run the same float32 computation on the same bank (same library build and
thread count, as on one machine or a homogeneous cluster).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from contracts.index import as_float32
from datamodules.samplers import RandomBatchSampler


def cluster_sizes(n: int, num_clusters: int) -> np.ndarray:
    """The sizes of ``num_clusters`` balanced clusters of ``n`` points: the first ``n % K`` hold one more."""
    q, r = divmod(n, num_clusters)
    return np.array([q + 1] * r + [q] * (num_clusters - r), dtype=np.int64)


def balanced_two_means(x: Tensor, node: Tensor, n_left: Tensor, rng: np.random.Generator, niter: int = 10) -> Tensor:
    """Balanced spherical 2-means of ``P`` point sets at once: split each set into its ``n_left[p]`` rows and the rest.

    ``x: [M, D]`` unit rows, ``node: [M]`` the set of each row (sorted: a set's rows are contiguous),
    ``n_left: [P]`` with ``1 <= n_left[p] < |set p|``. Two distinct rows drawn from ``rng`` seed the
    centroids of each set; each iteration ranks a set's rows by ``x . (mu_left - mu_right)`` (the
    difference of their cosine similarities to the two unit centroids), sends the first ``n_left``
    left (ties: the earlier row) and recomputes the centroids, until no split changes or ``niter``.
    ``O(M D)`` per iteration whatever the number of sets. Returns the left mask ``[M]``.
    """
    num_sets = len(n_left)
    count = torch.bincount(node, minlength=num_sets)
    if bool(((n_left < 1) | (n_left >= count)).any()):
        raise ValueError(f"balanced_two_means: every n_left must be in 1..n-1, got n_left={n_left.tolist()} for set sizes {count.tolist()}")
    start = torch.cumsum(count, 0) - count
    n = count.numpy()
    first = np.floor(rng.random(num_sets) * n).astype(np.int64)
    second = (first + 1 + np.floor(rng.random(num_sets) * (n - 1)).astype(np.int64)) % n  # never ``first``
    c_left, c_right = x[start + torch.from_numpy(first)], x[start + torch.from_numpy(second)]
    place = torch.arange(len(x)) - start[node]  # a row's place in its set once the set is sorted by score
    left = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(max(1, niter)):
        score = (x * (c_left - c_right)[node]).sum(1)
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(node[order], stable=True)]  # grouped by set, best first within a set
        new_left = torch.empty_like(left)
        new_left[order] = place < n_left[node]
        if torch.equal(new_left, left):
            break
        left = new_left
        sums = torch.zeros(2 * num_sets, x.shape[1], dtype=x.dtype).index_add_(0, 2 * node + (~left).long(), x)
        c_left, c_right = _unit(sums.view(num_sets, 2, -1)).unbind(1)
    return left


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def balanced_kmeans(embeddings: Tensor | np.ndarray, num_clusters: int, *, seed: int = 0, niter: int = 10) -> list[np.ndarray]:
    """``num_clusters`` clusters of the rows of ``embeddings: [N, D]`` with ``floor(N/K)`` or ``ceil(N/K)`` rows each.

    Recursive balanced spherical 2-means (module docstring): the node holding the leaves
    ``[a, b)`` is split between leaves ``[a, mid)`` and ``[mid, b)`` (``mid`` the middle), its left
    part getting exactly as many rows as those leaves hold (``cluster_sizes``), so ``K`` need not be
    a power of two. All nodes of one depth are split together (``balanced_two_means``), ``O(N D niter)``
    per depth and ``ceil(log2 K)`` depths. Cosine geometry (rows are L2-normalised). Deterministic
    for ``seed``. Returns the clusters as sorted row-index arrays, in leaf order.
    """
    data = as_float32(embeddings, normalize=True)
    if data.ndim != 2:
        raise ValueError(f"balanced_kmeans: embeddings have shape {tuple(data.shape)}; expected [N, D]")
    x = torch.from_numpy(data)
    n = len(x)
    if not 1 <= num_clusters <= n:
        raise ValueError(f"balanced_kmeans: num_clusters={num_clusters} must be in 1..{n} (the number of rows)")
    bounds = np.concatenate([[0], np.cumsum(cluster_sizes(n, num_clusters))])
    rng = np.random.default_rng(seed)
    leaves: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clusters
    level: list[tuple[np.ndarray, int, int]] = [(np.arange(n, dtype=np.int64), 0, num_clusters)]
    while level:
        split = []
        for rows, a, b in level:
            if b - a == 1:
                leaves[a] = np.sort(rows)
            else:
                split.append((rows, a, b))
        if not split:
            break
        rows_all = np.concatenate([rows for rows, _, _ in split])
        node = torch.from_numpy(np.repeat(np.arange(len(split)), [len(rows) for rows, _, _ in split]))
        mids = [a + (b - a) // 2 for _, a, b in split]
        n_left = torch.tensor([int(bounds[mid] - bounds[a]) for (_, a, _), mid in zip(split, mids)])
        left = balanced_two_means(x[torch.from_numpy(rows_all)], node, n_left, rng, niter).numpy()
        level, offset = [], 0
        for (rows, a, b), mid in zip(split, mids):
            side = left[offset : offset + len(rows)]
            offset += len(rows)
            level += [(rows[side], a, mid), (rows[~side], mid, b)]
    return leaves


class NGAMEBatchSampler(Sampler[list[int]]):
    """NGAME's cluster mini-batches (module docstring): random during the warm-up, then unions of whole clusters.

    A ``BatchSamplerFactory`` (``datamodules.samplers``): the DataModule calls it with the train labels
    (only their number is used) and this process's ``rank``/``world_size``/``seed``. From epoch
    ``warmup_epochs`` on it needs the training points' embeddings at every re-clustering epoch, given
    by ``set_embeddings`` (``experiments.callbacks.NGAMEMemoryBank`` does it at the epoch start).

    In the cluster phase with cluster size ``C`` (the schedule's, capped at the global batch
    ``G = batch_size * world_size``), the ``N`` points form ``K = N // C`` balanced clusters
    (``balanced_kmeans``), a global batch is ``m = G // C`` whole clusters taken in the order of a
    permutation drawn from ``(seed, epoch, pass)`` (so ``m * floor(N/K)`` to ``m * ceil(N/K)`` points:
    exactly ``G`` when ``C`` divides ``N`` and ``G``), and rank ``r`` takes the ``r``-th of
    ``world_size`` contiguous, near-equal shards of it. When a pass over the clusters is used up
    (``K // m`` global batches) a new permutation starts.

    Args:
        labels: per-train-item sequence (``arange(num_train_queries)``); its length is the number of points ``N``.
        batch_size: points per rank per step (``G / world_size``).
        rank, world_size, seed: this process's place in DDP and the global seed (``BatchSamplerFactory``).
        cluster_size: ``C`` before any doubling of the schedule (the paper's code starts at 1 and doubles at its warm-up epoch).
        warmup_epochs: random batches before this epoch (>= 1: the memory bank is filled during epoch 0).
        recluster_every: ``R``: re-cluster every ``R`` epochs from ``warmup_epochs`` on.
        cluster_size_schedule: epochs at which ``C`` doubles (the paper's ``sampling_curr_epochs``).
        num_batches: batches per epoch per rank; default ``N // G`` (one pass of the random sampler).
        niter: 2-means iterations per split.

    Attributes:
        size: ``N``. clusters: the current clusters (sorted row arrays) or None. clustered_epoch: when they were made.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int = 32,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        cluster_size: int = 2,
        warmup_epochs: int = 1,
        recluster_every: int = 1,
        cluster_size_schedule: Sequence[int] = (),
        num_batches: int | None = None,
        niter: int = 10,
    ) -> None:
        name = type(self).__name__
        if cluster_size < 1:
            raise ValueError(f"{name}: cluster_size must be >= 1, got {cluster_size}")
        if warmup_epochs < 1:
            raise ValueError(f"{name}: warmup_epochs must be >= 1 (the memory bank is filled by the epochs before the first clustering), "
                             f"got {warmup_epochs}")
        if recluster_every < 1:
            raise ValueError(f"{name}: recluster_every must be >= 1, got {recluster_every}")
        schedule = sorted(int(s) for s in cluster_size_schedule)
        if any(s < 0 for s in schedule) or len(set(schedule)) != len(schedule):
            raise ValueError(f"{name}: cluster_size_schedule must list distinct epochs >= 0, got {list(cluster_size_schedule)}")
        # the warm-up sampler checks batch_size, rank, world_size, num_batches and the dataset size
        self.random = RandomBatchSampler(labels, batch_size, rank=rank, world_size=world_size, seed=seed, num_batches=num_batches)
        self.size, self.batch_size = self.random.size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        self.num_batches = self.random.num_batches
        self.cluster_size, self.warmup_epochs, self.recluster_every = cluster_size, warmup_epochs, recluster_every
        self.cluster_size_schedule, self.niter = schedule, niter
        self.epoch = 0
        self.clusters: list[np.ndarray] | None = None
        self.clustered_epoch: int | None = None
        self._embeddings: Tensor | None = None
        self._seen: Tensor | None = None
        self._fresh = False  # embeddings given since the last clustering
        # Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``, not on the batch sampler itself.
        self.sampler = self

    # ------------------------------------------------------------------------------ schedule
    def cluster_size_at(self, epoch: int) -> int | None:
        """The cluster size of ``epoch`` (capped at the global batch), or None during the warm-up (random batches)."""
        if epoch < self.warmup_epochs:
            return None
        doublings = sum(s <= epoch for s in self.cluster_size_schedule)
        return min(self.cluster_size * 2**doublings, self.global_batch)

    def reclusters_at(self, epoch: int) -> bool:
        """Whether ``epoch`` recomputes the clusters (the first clustering epoch, every ``R`` after it, and size changes)."""
        if epoch < self.warmup_epochs:
            return False
        return (epoch - self.warmup_epochs) % self.recluster_every == 0 or epoch in self.cluster_size_schedule

    def needs_embeddings(self, epoch: int) -> bool:
        """Whether the batches of ``epoch`` need ``set_embeddings`` first (a re-clustering epoch not yet
        clustered, or the cluster phase without clusters, as after a resume)."""
        if epoch < self.warmup_epochs or self.clustered_epoch == epoch:
            return False
        return self.reclusters_at(epoch) or self.clusters is None

    def set_embeddings(self, embeddings: Tensor | np.ndarray, seen: Tensor | np.ndarray | None = None) -> None:
        """Hand the memory bank: ``embeddings: [N, D]`` by train row; ``seen: [N]`` bool (False: a row no
        step has embedded yet; it is placed by a random direction drawn from the seed). Clustering
        happens lazily, when the next re-clustering epoch's batches are drawn."""
        emb = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
        if emb.dim() != 2 or len(emb) != self.size:
            raise ValueError(f"{type(self).__name__}.set_embeddings: embeddings have shape {tuple(emb.shape)}; expected [{self.size}, D] "
                             f"(one row per train point)")
        mask = torch.ones(self.size, dtype=torch.bool) if seen is None else torch.as_tensor(seen).to("cpu", torch.bool)
        if tuple(mask.shape) != (self.size,):
            raise ValueError(f"{type(self).__name__}.set_embeddings: seen has shape {tuple(mask.shape)}; expected [{self.size}]")
        self._embeddings, self._seen, self._fresh = emb.clone(), mask.clone(), True

    def set_epoch(self, epoch: int) -> None:
        """Called at each epoch start; every rank reshuffles the same way."""
        self.epoch = epoch
        self.random.set_epoch(epoch)

    def __len__(self) -> int:
        return self.num_batches

    # ------------------------------------------------------------------------------- batches
    def _cluster(self, epoch: int) -> list[np.ndarray]:
        """The clusters for ``epoch``, recomputed from the latest embeddings when the schedule says so."""
        name = type(self).__name__
        if not self.needs_embeddings(epoch):
            return self.clusters
        if self._embeddings is None or (not self._fresh and self.clusters is not None):
            have = "no embeddings" if self._embeddings is None else f"no new embeddings since epoch {self.clustered_epoch}"
            raise RuntimeError(
                f"{name}: epoch {epoch} clusters the train points (warmup_epochs={self.warmup_epochs}, recluster_every="
                f"{self.recluster_every}) but has {have}; add experiments.callbacks.NGAMEMemoryBank to trainer.callbacks "
                f"(it hands the step's embeddings to the sampler) or call set_embeddings(embeddings) before iterating"
            )
        emb = self._embeddings.clone()
        unseen = ~self._seen
        if bool(unseen.any()):
            gen = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch, 1]).integers(2**62)))
            emb[unseen] = torch.randn(int(unseen.sum()), emb.shape[1], generator=gen)
        size = self.cluster_size_at(epoch)
        num_clusters = max(1, self.size // size)
        self.clusters = balanced_kmeans(emb, num_clusters, seed=int(np.random.default_rng([self.seed, epoch]).integers(2**62)), niter=self.niter)
        self.clustered_epoch, self._fresh = epoch, False
        return self.clusters

    def global_batches(self, epoch: int | None = None) -> Iterator[np.ndarray]:
        """The global batches of ``epoch`` (default: the current one) in the cluster phase, each the
        concatenation of its whole clusters (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        clusters = self._cluster(epoch)
        size = self.cluster_size_at(epoch)
        per_batch = min(len(clusters), max(1, self.global_batch // size))
        per_pass = len(clusters) // per_batch
        for b in range(self.num_batches):
            pass_index, step = divmod(b, per_pass)
            if step == 0:
                order = np.random.default_rng([self.seed, epoch, pass_index, 2]).permutation(len(clusters))
            chosen = order[step * per_batch : (step + 1) * per_batch]
            yield np.concatenate([clusters[c] for c in chosen])

    def __iter__(self) -> Iterator[list[int]]:
        if self.epoch < self.warmup_epochs:
            yield from self.random
            return
        for batch in self.global_batches():
            shard = np.array_split(batch, self.world_size)[self.rank]
            yield [int(i) for i in shard]


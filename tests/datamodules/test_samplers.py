import numpy as np
import pytest

from datamodules.samplers import ClassBalancedBatchSampler


def _labels(n_classes=10, per_class=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.permutation(np.repeat(np.arange(n_classes), per_class))


def test_pk_structure():
    labels = _labels()
    sampler = ClassBalancedBatchSampler(labels, classes_per_batch=4, samples_per_class=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 12
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        _, counts = np.unique(labels[batch], return_counts=True)
        assert sorted(counts.tolist()) == [3, 3, 3, 3]


def test_deterministic_for_seed_and_epoch():
    labels = _labels()
    a = list(ClassBalancedBatchSampler(labels, 4, 3, seed=5))
    b = list(ClassBalancedBatchSampler(labels, 4, 3, seed=5))
    c = ClassBalancedBatchSampler(labels, 4, 3, seed=5)
    c.set_epoch(1)
    assert a == b
    assert a != list(c)
    assert a != list(ClassBalancedBatchSampler(labels, 4, 3, seed=6))


def test_ddp_shards_are_disjoint_and_concatenate_to_single_process():
    labels = _labels(n_classes=12)
    world = 2
    per_rank = [list(ClassBalancedBatchSampler(labels, 3, 2, num_batches=7, seed=3, rank=r, world_size=world)) for r in range(world)]
    single = list(ClassBalancedBatchSampler(labels, 3 * world, 2, num_batches=7, seed=3))
    for step in range(7):
        shards = [per_rank[r][step] for r in range(world)]
        classes = [set(labels[s].tolist()) for s in shards]
        assert not (classes[0] & classes[1]), "ranks must not share classes within a step"
        assert all(len(s) == 6 for s in shards)
        assert shards[0] + shards[1] == single[step]


def test_epoch_visits_each_sample_before_repeating():
    labels = np.repeat(np.arange(4), 6)
    sampler = ClassBalancedBatchSampler(labels, 4, 3, num_batches=2)
    seen = [i for b in sampler for i in b]
    assert sorted(seen) == list(range(24))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes_per_batch": 11, "samples_per_class": 2}, "needs 11 classes"),
        ({"classes_per_batch": 6, "samples_per_class": 2, "world_size": 2}, "needs 12 classes"),
        ({"classes_per_batch": 2, "samples_per_class": 13}, "K=13"),
    ],
)
def test_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(_labels(), **kwargs)

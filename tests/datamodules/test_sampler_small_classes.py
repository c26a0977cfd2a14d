"""``ClassBalancedBatchSampler(repeat_small_classes=True)``: classes smaller than K (SOP, In-Shop)."""

import numpy as np
import pytest

from datamodules.samplers import ClassBalancedBatchSampler

LABELS = np.repeat([0, 1, 2, 3, 4], [1, 2, 3, 6, 9])


def test_small_classes_fail_without_the_flag():
    with pytest.raises(ValueError, match="3 classes have fewer .* repeat_small_classes=True"):
        ClassBalancedBatchSampler(LABELS, classes_per_batch=2, samples_per_class=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_small_classes_repeat_evenly(seed):
    sampler = ClassBalancedBatchSampler(LABELS, 2, 4, num_batches=30, seed=seed, repeat_small_classes=True)
    for batch in sampler:
        labels = LABELS[batch]
        classes, counts = np.unique(labels, return_counts=True)
        assert len(batch) == 8 and len(classes) == 2 and counts.tolist() == [4, 4]
        for c in classes:
            members = np.asarray(batch)[labels == c]
            uses = np.unique(members, return_counts=True)[1]
            n = int((LABELS == c).sum())
            assert len(np.unique(members)) == min(n, 4)  # every member of a small class appears
            assert uses.max() - uses.min() <= 1  # ... and as evenly as possible


def test_ddp_shards_with_small_classes_concatenate_to_one_process():
    single = list(ClassBalancedBatchSampler(LABELS, 4, 3, num_batches=5, seed=3, repeat_small_classes=True))
    ranks = [
        list(ClassBalancedBatchSampler(LABELS, 2, 3, num_batches=5, seed=3, rank=r, world_size=2, repeat_small_classes=True))
        for r in range(2)
    ]
    for step in range(5):
        assert ranks[0][step] + ranks[1][step] == single[step]
        assert not set(LABELS[ranks[0][step]]) & set(LABELS[ranks[1][step]])

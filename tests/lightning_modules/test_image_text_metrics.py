"""Image<->text Recall@K and zero-shot accuracy against brute-force loops (numpy, float64), the
torchmetrics classes against the functions, and a 2-process gloo run against one process."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

from lightning_modules.metrics.image_text import ImageTextRetrievalMetrics, image_text_retrieval
from lightning_modules.metrics.zero_shot import ZeroShotAccuracy, zero_shot_accuracy, zero_shot_classifier
from tests.helpers import gloo_group

KS = (1, 2, 5, 10, 500)
SEEDS = (0, 1, 2)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def paired(seed: int, n_images: int = 60, dim: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images with 1-5 noisy captions each (captions shuffled); informative but imperfect retrieval."""
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n_images, dim))
    per_image = rng.integers(1, 6, n_images)
    text_to_image = rng.permutation(np.repeat(np.arange(n_images), per_image))
    texts = images[text_to_image] + 1.6 * rng.normal(size=(len(text_to_image), dim))
    images = images * rng.uniform(0.5, 3.0, (n_images, 1))  # norms differ: cosine must normalise
    return torch.from_numpy(images), torch.from_numpy(texts), torch.from_numpy(text_to_image)


def assert_clear(scores: np.ndarray, own: int, gap: float = 1e-6) -> None:
    """Float32 search and float64 brute force rank alike only when no other score nearly ties ``scores[own]``."""
    others = np.delete(scores, own)
    assert np.abs(others - scores[own]).min() > gap


def brute_force_retrieval(images, texts, text_to_image, ks) -> dict[str, float]:
    """Rank = 1 + the number of references scoring strictly higher, one query at a time."""
    sim = unit(texts.numpy()) @ unit(images.numpy()).T  # [T, I]
    t2i_rank = []
    for t, i in enumerate(text_to_image.tolist()):
        assert_clear(sim[t], i)
        t2i_rank.append(1 + int((sim[t] > sim[t, i]).sum()))
    i2t_rank = []
    for i in range(len(images)):
        own = np.flatnonzero(text_to_image.numpy() == i)
        for t in own:
            assert_clear(sim[:, i], t)
        i2t_rank.append(min(1 + int((sim[:, i] > sim[t, i]).sum()) for t in own))  # best of its captions
    out = {f"i2t_r@{k}": float(np.mean([r <= k for r in i2t_rank])) for k in ks}
    out.update({f"t2i_r@{k}": float(np.mean([r <= k for r in t2i_rank])) for k in ks})
    return out


@pytest.mark.parametrize("seed", SEEDS)
def test_retrieval_matches_brute_force(seed: int) -> None:
    images, texts, text_to_image = paired(seed)
    ours = image_text_retrieval(images, texts, text_to_image, ks=KS)
    assert ours == brute_force_retrieval(images, texts, text_to_image, KS)
    assert 0.1 < ours["t2i_r@1"] < 0.95 and 0.1 < ours["i2t_r@1"] < 0.95  # informative, not degenerate
    assert ours["i2t_r@500"] == ours["t2i_r@500"] == 1.0  # K beyond the set counts everything


def test_chunked_search_equals_one_chunk() -> None:
    images, texts, text_to_image = paired(3)
    assert image_text_retrieval(images, texts, text_to_image, ks=KS, chunk_size=7) == image_text_retrieval(
        images, texts, text_to_image, ks=KS, chunk_size=100_000
    )


def test_i2t_counts_an_image_found_when_any_caption_is_in_its_top_k() -> None:
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a = [0.3, 1.0, 0.0]  # caption of image 0 that looks like image 1: cos 0.29 with image 0, 0.96 with image 1
    b = [1.0, 0.0, 0.1]  # caption of image 0: cos 0.995 with image 0
    c = [0.6, 0.8, 0.0]  # caption of image 1: cos 0.6 with image 0, 0.8 with image 1
    texts = torch.tensor([a, b, c])
    both = image_text_retrieval(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # image 0 ranks B, C, A: found at 1 through B although A ranks last; image 1 ranks A, C: found at 2
    assert both["i2t_r@1"] == 0.5 and both["i2t_r@2"] == 1.0
    # t2i: A -> image 1 (wrong), B -> image 0, C -> image 1
    assert both["t2i_r@1"] == pytest.approx(2 / 3) and both["t2i_r@2"] == 1.0
    # one caption per image (A, C): image 0 ranks C, A, so it is no longer found at 1
    single = image_text_retrieval(images, texts[[0, 2]], torch.tensor([0, 1]), ks=(1, 2))
    assert single["i2t_r@1"] == 0.0 and single["i2t_r@2"] == 1.0
    assert single["t2i_r@1"] == 0.5


def class_prompts(seed: int, n: int = 300, n_classes: int = 12, prompts: int = 4, dim: int = 10):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim))
    class_emb = centers[:, None, :] + 0.9 * rng.normal(size=(n_classes, prompts, dim))
    class_emb *= rng.uniform(0.2, 5.0, (n_classes, prompts, 1))  # prompt norms differ: normalise before the mean
    labels = rng.integers(0, n_classes, n)
    images = centers[labels] + 1.2 * rng.normal(size=(n, dim))
    return torch.from_numpy(images), torch.from_numpy(class_emb), torch.from_numpy(labels)


def brute_force_zero_shot(images, class_emb, labels, ks) -> dict[str, float]:
    w = unit(class_emb.numpy())
    if w.ndim == 3:
        w = unit(w.mean(axis=1))
    scores = unit(images.numpy()) @ w.T
    correct = {k: [] for k in ks}
    for row, y in zip(scores, labels.tolist()):
        assert_clear(row, y)
        rank = 1 + int((row > row[y]).sum())
        for k in ks:
            correct[k].append(rank <= k)
    return {f"acc@{k}": float(np.mean(v)) for k, v in correct.items()}


@pytest.mark.parametrize("seed", SEEDS)
def test_zero_shot_matches_brute_force_with_and_without_prompt_ensembles(seed: int) -> None:
    images, class_emb, labels = class_prompts(seed)
    ks = (1, 3, 5, 12, 50)
    ensemble = zero_shot_accuracy(images, class_emb, labels, ks=ks)
    assert ensemble == brute_force_zero_shot(images, class_emb, labels, ks)
    assert 0.2 < ensemble["acc@1"] < 0.95 and ensemble["acc@12"] == 1.0
    first_prompt = zero_shot_accuracy(images, class_emb[:, 0], labels, ks=ks)
    assert first_prompt == brute_force_zero_shot(images, class_emb[:, 0], labels, ks)
    # the unnormalised mean weighs long prompts more: a different classifier
    raw_mean = torch.from_numpy(unit(class_emb.numpy().mean(axis=1)))
    assert not torch.allclose(zero_shot_classifier(class_emb).double(), raw_mean, atol=1e-3)


def test_metric_classes_in_one_process_equal_the_functions() -> None:
    images, texts, text_to_image = paired(4)
    expected = image_text_retrieval(images, texts, text_to_image, ks=KS)
    metric = ImageTextRetrievalMetrics(ks=KS, chunk_size=16)
    g = torch.Generator().manual_seed(0)
    img_order = torch.cat([torch.randperm(len(images), generator=g), torch.tensor([3, 5])])  # shuffled, 2 repeats
    txt_order = torch.cat([torch.randperm(len(texts), generator=g), torch.tensor([0])])
    for chunk in img_order.split(13):
        metric.update_images(images[chunk].float(), chunk)
    for chunk in txt_order.split(29):
        metric.update_texts(texts[chunk].float(), chunk, text_to_image[chunk])
    assert metric.compute() == expected
    # images and captions in the same update call
    together = ImageTextRetrievalMetrics(ks=KS)
    together.update(images, torch.arange(len(images)), texts, torch.arange(len(texts)), text_to_image)
    assert together.compute() == expected

    x, class_emb, labels = class_prompts(5)
    zs = ZeroShotAccuracy(ks=(1, 5))
    zs.set_classifier(class_emb)
    order = torch.cat([torch.randperm(len(x), generator=g), torch.tensor([1, 2, 3])])
    for chunk in order.split(40):
        zs.update(x[chunk], labels[chunk], index=chunk)
    assert zs.compute() == zero_shot_accuracy(x, class_emb, labels)
    no_index = ZeroShotAccuracy(ks=(1, 5))
    no_index.set_classifier(class_emb)
    no_index.update(x[order], labels[order])
    assert no_index.compute() != zero_shot_accuracy(x, class_emb, labels)  # the repeats count without index


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(3, 4), torch.ones(5, 3), torch.tensor([0, 1, 2, 0, 1])), "dimension 3 but image_emb has 4"),
        ((torch.ones(3, 4), torch.ones(5, 4), torch.tensor([0, 1, 2, 0])), "text_to_image has 4 entries but text_emb has 5"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0, 3])), r"text_to_image\[1\] = 3 but image_emb has 3 rows"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0, 1])), r"1 images have no caption \(image_emb rows \[2\]\)"),
        ((torch.ones(3, 4), torch.ones(2, 4), torch.tensor([0.0, 1.0])), "text_to_image must be an integer array"),
        ((torch.ones(3, 4), torch.ones(3, 4), torch.tensor([0, -1, 2])), "negative entries"),
        ((torch.ones(3), torch.ones(3, 4), torch.tensor([0, 1, 2])), r"image_emb must be .*\[N, D\]"),
    ],
)
def test_retrieval_bad_input_raises_a_clear_error(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        image_text_retrieval(*args)


def test_zero_shot_bad_input_and_metric_misuse() -> None:
    with pytest.raises(ValueError, match=r"class_emb must be .*\[C, D\] or \[C, P, D\]"):
        zero_shot_accuracy(torch.ones(4, 3), torch.ones(3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="label 7 is not a class"):
        zero_shot_accuracy(torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match="dimension 3 but class_emb has 6"):
        zero_shot_accuracy(torch.randn(4, 3), torch.randn(5, 2, 6), torch.tensor([0, 1, 2, 2]))
    zs = ZeroShotAccuracy()
    with pytest.raises(ValueError, match="call set_classifier"):
        zs.update(torch.randn(4, 3), torch.arange(4))
    zs.set_classifier(torch.randn(5, 3))
    zs.update(torch.randn(4, 3), torch.arange(4), index=torch.arange(4))
    with pytest.raises(ValueError, match="every update or in none"):
        zs.update(torch.randn(4, 3), torch.arange(4))
    metric = ImageTextRetrievalMetrics()
    with pytest.raises(ValueError, match="text_to_image must be an integer tensor"):
        metric.update_texts(torch.randn(4, 3), torch.arange(4), torch.arange(3))
    metric.update_images(torch.randn(3, 3), torch.arange(3))
    with pytest.raises(ValueError, match="needs images and captions"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.compute()
    metric.update_texts(torch.randn(2, 3), torch.arange(2), torch.tensor([0, 9]))
    # a partial pass: the caption of an image never added and the images without a caption are left out, with warnings
    with pytest.warns(UserWarning, match=r"caption index 1 -> image index 9"), pytest.warns(UserWarning, match="2 images have no caption"):
        values = metric.compute()
    assert values["i2t_r@1"] == 1.0 and values["t2i_r@1"] == 1.0  # one image, one caption left


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, images, texts, text_to_image, x, class_emb, labels) -> None:
    torch.set_num_threads(1)  # two processes on a shared CPU
    with gloo_group(rank, world, init_file):
        results = {}
        for sharded in (True, False):
            metric = ImageTextRetrievalMetrics(ks=KS, chunk_size=8, sharded=sharded)
            # shuffled, padded shards (odd sizes: one repeat each), as Lightning's DistributedSampler gives
            img_shard = torch.tensor(list(DistributedSampler(range(len(images)), world, rank, shuffle=True, seed=1)))
            txt_shard = torch.tensor(list(DistributedSampler(range(len(texts)), world, rank, shuffle=True, seed=2)))
            for chunk in img_shard.split(9):
                metric.update_images(images[chunk], chunk)
            for chunk in txt_shard.split(25):
                metric.update_texts(texts[chunk], chunk, text_to_image[chunk])
            results[f"retrieval_sharded={sharded}"] = metric.compute()
        # uneven contiguous halves, no duplicates: rank 0 gets 3/4 of the images and 1/4 of the texts
        uneven = ImageTextRetrievalMetrics(ks=KS)
        cut_i, cut_t = (3 * len(images)) // 4, len(texts) // 4
        img_part = torch.arange(cut_i) if rank == 0 else torch.arange(cut_i, len(images))
        txt_part = torch.arange(cut_t) if rank == 0 else torch.arange(cut_t, len(texts))
        uneven.update_images(images[img_part], img_part)
        uneven.update_texts(texts[txt_part], txt_part, text_to_image[txt_part])
        results["retrieval_uneven"] = uneven.compute()
        zs = ZeroShotAccuracy(ks=(1, 5))
        zs.set_classifier(class_emb)
        shard = torch.tensor(list(DistributedSampler(range(len(x)), world, rank, shuffle=True, seed=3)))
        for chunk in shard.split(32):
            zs.update(x[chunk], labels[chunk], index=chunk)
        results["zero_shot"] = zs.compute()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(tmp_path: Path) -> None:
    images, texts, text_to_image = paired(9, n_images=41)
    x, class_emb, labels = class_prompts(7, n=201)
    assert len(texts) % 2 == 1  # both sets pad a repeat onto one rank
    mp.spawn(
        _ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), images, texts, text_to_image, x, class_emb, labels), nprocs=2
    )
    retrieval = image_text_retrieval(images, texts, text_to_image, ks=KS)
    expected = {
        "retrieval_sharded=True": retrieval,
        "retrieval_sharded=False": retrieval,
        "retrieval_uneven": retrieval,
        "zero_shot": zero_shot_accuracy(x, class_emb, labels),
    }
    assert brute_force_retrieval(images, texts, text_to_image, KS) == retrieval
    for rank in range(2):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected

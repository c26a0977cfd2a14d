"""ImageTextDataModule on files written by the scene generator: CSV and tar-shard readers, the batch contract,
evaluation loaders, skipped samples, brace expansion, and per-rank/worker sharding."""

import csv
import io
import tarfile
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from PIL import Image

from datamodules.caption_csv import read_caption_csv
from datamodules.fashion_mnist import DEBIAN_ROOT
from datamodules.fashion_scenes import CLASS_NAMES, generate_scenes
from datamodules.image_text import ImageTextDataModule
from datamodules.shard_stream import ShardStream
from datamodules.webdataset_shards import expand_braces, expand_shards, scan_shards
from tests.helpers import require_path

L = 96  # tokens per text of the test tokenizer


def char_tokenizer(texts):
    """``list[str] -> LongTensor [B, L]``: character codes, 0-padded (invertible, so tests can read texts back)."""
    out = torch.zeros(len(texts), L, dtype=torch.long)
    for row, text in enumerate(texts):
        codes = [ord(ch) for ch in text[:L]]
        out[row, : len(codes)] = torch.tensor(codes, dtype=torch.long)
    return out


def detok(ids):
    return ["".join(chr(int(c)) for c in row if c) for row in ids]


CONFIG = {"tokenizer": char_tokenizer, "context_length": L, "input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "interpolation": "bilinear", "crop_pct": 1.0}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    return generate_scenes(tmp_path_factory.mktemp("scenes"), n_train=200, n_test=60, seed=0, shard_size=50, with_negatives=True)


def datamodule(train, test=None, **kw):
    kw = {"batch_size": 8, "num_workers": 0, "data_config": CONFIG, **kw}
    dm = ImageTextDataModule(train=train, test=test, **kw)
    dm.setup("fit")
    return dm


def shard_members(pattern):
    """``{index: (captions, neg_captions)}`` of every sample, read with tarfile directly."""
    out = {}
    for s, path in enumerate(expand_shards(pattern)):
        with tarfile.open(path) as tar:
            names = [m.name for m in tar.getmembers()]
            keys = list(dict.fromkeys(n.split(".")[0] for n in names))
            for pos, key in enumerate(keys):
                txt = tar.extractfile(f"{key}.txt").read().decode().splitlines()
                neg = tar.extractfile(f"{key}.neg_caption").read().decode().splitlines() if f"{key}.neg_caption" in names else []
                out[(s << 24) | pos] = (txt, neg)
    return out


def check_train_batch(batch, b=8):
    assert {"image", "text", "index", "neg_text", "neg_image", "has_neg"} <= set(batch)
    assert batch["image"].shape == (b, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["neg_image"].shape == (b, 3, 32, 32) and batch["neg_image"].dtype == torch.float32
    assert batch["text"].shape == (b, L) and batch["text"].dtype == torch.long
    assert batch["neg_text"].shape == (b, L) and batch["neg_text"].dtype == torch.long
    assert batch["index"].shape == (b,) and batch["index"].dtype == torch.long
    assert batch["has_neg"].dtype == torch.bool
    # an item without a negative has an empty negative caption and a zero image
    for i in torch.nonzero(~batch["has_neg"]).flatten().tolist():
        assert not batch["neg_text"][i].any() and not batch["neg_image"][i].any()


def test_csv_train_batches_pair_each_image_with_its_row(scenes):
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv))
    table = read_caption_csv(scenes.train_csv)
    loader = dm.train_dataloader()
    assert len(loader) == 200 // 8
    batch = next(iter(loader))
    check_train_batch(batch)
    for i, row in enumerate(batch["index"].tolist()):
        assert detok(batch["text"][i : i + 1])[0] == table.captions[row]
        assert detok(batch["neg_text"][i : i + 1])[0] == (table.neg_captions[row] or "")
    # the eval transform of the row's own image (augment=False makes train == eval)
    dm2 = datamodule(str(scenes.train_csv), str(scenes.test_csv), augment=False)
    item = dm2.train_dataset[5]
    ref = dm2.test_dataset.images.transform(Image.open(table.images[5]).convert("RGB"))
    torch.testing.assert_close(item["image"], ref)


def test_shard_train_batches_carry_the_sample_caption(scenes):
    dm = datamodule(scenes.train_shards, scenes.test_shards)
    members = shard_members(scenes.train_shards)
    loader = dm.train_dataloader()
    assert len(loader) == 200 // 8
    batches = list(loader)
    assert len(batches) == 25
    for batch in batches[:5]:
        check_train_batch(batch)
        for i, index in enumerate(batch["index"].tolist()):
            captions, negs = members[index]
            assert detok(batch["text"][i : i + 1])[0] in captions
            assert bool(batch["has_neg"][i]) == bool(negs)
            if negs:
                assert detok(batch["neg_text"][i : i + 1])[0] == negs[captions.index(detok(batch["text"][i : i + 1])[0])]
    # one epoch of 200 // 8 batches reads every sample exactly once
    seen = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(seen) == sorted(members)


def test_eval_loaders_group_captions_by_image(scenes):
    with open(scenes.test_csv) as f:
        rows = list(csv.DictReader(f))
    images = list(dict.fromkeys(r["image"] for r in rows))
    expected = torch.tensor([images.index(r["image"]) for r in rows])
    for test in (str(scenes.test_csv), scenes.test_shards):
        dm = datamodule(str(scenes.train_csv), test)
        assert torch.equal(dm.text_to_image("test"), expected)
        assert torch.equal(dm.text_to_image("validate"), expected)  # val defaults to the test split
        loaders = dm.test_dataloader()
        assert len(loaders) == 2
        img_batches, cap_batches = list(loaders[0]), list(loaders[1])
        idx = torch.cat([b["index"] for b in img_batches])
        assert torch.equal(idx, torch.arange(60)) and set(img_batches[0]) == {"image", "index"}
        assert img_batches[0]["image"].shape[1:] == (3, 32, 32)
        caps = [t for b in cap_batches for t in detok(b["text"])]
        assert caps == [r["caption"] for r in rows]
        assert torch.equal(torch.cat([b["image_index"] for b in cap_batches]), expected)
        assert set(cap_batches[0]) == {"text", "index", "image_index"} and cap_batches[0]["text"].dtype == torch.long
        assert dm.split_sizes()["test"] == {"images": 60, "captions": 180}


def test_eval_loaders_are_sharded_across_ranks(scenes):
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv), eval_batch_size=7)
    seen = []
    for rank in range(3):
        dm._rank_world = lambda rank=rank: (rank, 3)
        loaders = dm.test_dataloader()
        seen.append(torch.cat([b["index"] for b in loaders[1]]))
    assert len({len(s) for s in seen}) == 1 and set(torch.cat(seen).tolist()) == set(range(180))


def test_zero_shot_fashion_mnist_loader(scenes):
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv), zero_shot="fashion_mnist", zero_shot_size=50)
    assert dm.zero_shot_classes == list(CLASS_NAMES) and "{}" in dm.zero_shot_templates[0]
    loaders = dm.val_dataloader()
    assert len(loaders) == 3
    batch = next(iter(loaders[2]))
    assert set(batch) == {"image", "label", "index"} and batch["image"].shape[1:] == (3, 32, 32)
    labels = torch.cat([b["label"] for b in loaders[2]])
    assert len(labels) == 50 and set(labels.tolist()) == set(range(10))


def test_zero_shot_csv_and_its_errors(scenes, tmp_path):
    with open(scenes.test_csv) as f:
        first = next(csv.DictReader(f))["image"]
    zs = tmp_path / "zs.csv"
    zs.write_text(f"image,label\n{scenes.root / first},1\n{scenes.root / first},cat\n")
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv), zero_shot=str(zs), class_names=["dog", "cat"])
    assert dm.zero_shot_dataset.labels.tolist() == [1, 1]
    zs.write_text(f"image,label\n{scenes.root / first},7\n")
    with pytest.raises(ValueError, match=r"zs.csv line 2 column 'label'"):
        datamodule(str(scenes.train_csv), str(scenes.test_csv), zero_shot=str(zs), class_names=["dog", "cat"])
    with pytest.raises(ValueError, match="needs class_names"):
        ImageTextDataModule(train=str(scenes.train_csv), zero_shot=str(zs))


def write_shard(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def corrupt_copy(src: str, dst: Path, n=20):
    """The first ``n`` samples of ``src``; sample 3's PNG truncated, sample 10 without its caption."""
    with tarfile.open(src) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))[:n]
    out = []
    for name, data in members:
        key = name.split(".")[0]
        if key not in keys or (key == keys[10] and name.endswith(".txt")):
            continue
        out.append((name, data[: len(data) // 2] if key == keys[3] and name.endswith(".png") and "neg" not in name else data))
    write_shard(dst, out)


def test_corrupt_samples_are_skipped_and_counted(scenes, tmp_path):
    bad = tmp_path / "bad-000000.tar"
    corrupt_copy(expand_shards(scenes.train_shards)[0], bad)
    assert scan_shards([str(bad)]).samples == 19 and scan_shards([str(bad)]).incomplete == 1
    dm = datamodule(str(bad), str(bad), batch_size=6, num_batches=3, shuffle_buffer=1)
    assert dm.skipped_samples() == {"train": 0, "test": 2}
    assert dm.split_sizes()["test"] == {"images": 18, "captions": 18}
    batches = list(dm.train_dataloader())  # one sequential pass: 18 good samples, 2 skipped on the way
    assert len(batches) == 3 and sorted(torch.cat([b["index"] for b in batches]).tolist()) == [i for i in range(20) if i not in (3, 10)]
    assert dm.skipped_samples() == {"train": 2, "test": 2}
    with pytest.warns(UserWarning, match=r"skipped samples per split: \{'train': 2, 'test': 2\}"):
        dm.teardown("fit")
    assert "skipped: 2" in dm.data_summary()


def test_a_truncated_shard_counts_its_broken_sample(scenes, tmp_path):
    src = Path(expand_shards(scenes.train_shards)[0])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(src.read_bytes()[: 30_000])
    dm = datamodule(str(cut), str(cut))
    assert dm.skipped_samples()["test"] == 1 and 0 < len(dm.test_dataset.images) < 50


def test_shards_and_csv_from_workers_share_counts_and_epochs(scenes, tmp_path):
    bad = tmp_path / "bad-000000.tar"
    corrupt_copy(expand_shards(scenes.train_shards)[0], bad)
    good = expand_shards(scenes.train_shards)[1:]
    dm = datamodule([str(bad), *good], str(scenes.test_csv), batch_size=10, num_workers=2, persistent_workers=True)
    loader = dm.train_dataloader()
    assert len(loader) == (19 + 150) // 10
    epochs = []
    for epoch in range(2):
        _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls
        epochs.append(torch.cat([b["index"] for b in loader]).tolist())
    assert len(epochs[0]) == len(epochs[1]) == 160 and epochs[0] != epochs[1]
    assert dm.skipped_samples()["train"] >= 2  # each worker process counted into shared memory
    _set_sampler_epoch(loader, 0)
    assert torch.cat([b["index"] for b in loader]).tolist() == epochs[0]  # deterministic per (seed, epoch)


@pytest.mark.parametrize("world, workers", [(2, 2), (3, 2)])
def test_ranks_and_workers_get_equal_batches_of_disjoint_samples(scenes, world, workers):
    shards = expand_shards(scenes.train_shards)  # 4 shards of 50: (2, 2) splits shards, (3, 2) splits samples
    per_rank = 200 // (10 * world)
    seen, counts = [], []
    for rank in range(world):
        stream = ShardStream(shards, batch_size=10, num_batches=per_rank, rank=rank, world_size=world, seed=1, shuffle_buffer=16)
        batches = [b for w in range(workers) for b in stream.iter_slot(w, workers)]
        counts.append(len(batches))
        seen += [item["index"] for b in batches for item in b]
    assert counts == [per_rank] * world
    assert len(seen) == len(set(seen)) == per_rank * world * 10


@pytest.mark.parametrize("world, workers", [(1, 2), (2, 3), (3, 1)])
def test_counted_shards_are_cut_into_disjoint_chunks(scenes, world, workers):
    shards = expand_shards(scenes.train_shards)
    sizes = scan_shards(shards).raw_per_shard
    per_rank = 200 // (8 * world)  # workers' shares differ by one batch when per_rank % workers != 0
    seen = []
    for rank in range(world):
        stream = ShardStream(shards, batch_size=8, num_batches=per_rank, rank=rank, world_size=world, seed=5, shuffle_buffer=10, shard_sizes=sizes)
        per_worker = [list(stream.iter_slot(w, workers)) for w in range(workers)]
        assert sum(map(len, per_worker)) == per_rank and max(map(len, per_worker)) - min(map(len, per_worker)) <= 1
        seen += [item["index"] for batches in per_worker for b in batches for item in b]
    assert len(seen) == len(set(seen)) == per_rank * world * 8


def test_datamodule_gives_every_rank_the_same_number_of_batches(scenes):
    dm = ImageTextDataModule(train=scenes.train_shards, batch_size=8, num_workers=0, data_config=CONFIG)
    dm.setup("fit")
    lengths, seen = [], []
    for rank in range(3):
        dm._rank_world = lambda rank=rank: (rank, 3)
        batches = list(dm.train_dataloader())
        lengths.append(len(batches))
        seen += torch.cat([b["index"] for b in batches]).tolist()
    assert lengths == [200 // 24] * 3 and len(seen) == len(set(seen))
    dm2 = ImageTextDataModule(train=scenes.train_shards, batch_size=8, num_workers=0, data_config=CONFIG, num_samples=1000)
    dm2.setup("fit")
    assert len(dm2.train_dataloader()) == 1000 // 8  # a declared total: cycles over the 200 samples


def test_csv_batches_are_disjoint_across_ranks_and_reshuffled_per_epoch(scenes):
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv), batch_size=16)
    per_rank = []
    for rank in range(3):
        dm._rank_world = lambda rank=rank: (rank, 3)
        loader = dm.train_dataloader()
        per_rank.append([torch.cat([b["index"] for b in loader]).tolist()])
        _set_sampler_epoch(loader, 1)  # what Lightning's fit loop calls
        per_rank[-1].append(torch.cat([b["index"] for b in loader]).tolist())
    assert [len(p[0]) for p in per_rank] == [200 // 48 * 16] * 3
    first = [i for p in per_rank for i in p[0]]
    assert len(first) == len(set(first)) and all(p[0] != p[1] for p in per_rank)


def test_brace_expansion_and_shard_lists(scenes, tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="braces must hold"):
        expand_braces("s-{x}.tar")
    root = scenes.root
    by_braces = expand_shards(scenes.train_shards)
    assert by_braces == [str(root / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(str(root / "train-*.tar")) == by_braces
    assert expand_shards([str(root / "train-{000000..000001}.tar"), str(root / "train-00000[23].tar")]) == by_braces
    with pytest.raises(FileNotFoundError, match=r"6 of 10 shards .* do not exist: .*train-000004.tar, .*train-000006.tar \(and 3 more\)"):
        expand_shards(str(root / "train-{000000..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_shards(str(root / "nothing-*.tar"))


def test_csv_errors_name_file_line_and_column(scenes, tmp_path):
    rows = scenes.train_csv.read_text().splitlines()
    no_col = tmp_path / "nocap.csv"
    no_col.write_text("image,text\n" + "\n".join(r.split(",")[0] + ",x" for r in rows[1:3]))
    with pytest.raises(ValueError, match=r"nocap.csv line 1: the header .* lacks the column\(s\) \['caption'\]"):
        read_caption_csv(no_col, image_root=scenes.root)
    missing = tmp_path / "missing.csv"
    missing.write_text("\n".join([rows[0], rows[1], rows[2].replace("000001.png,", "999999.png,", 1)]))
    with pytest.raises(FileNotFoundError, match=r"missing.csv line 3 column 'image': image file .*999999.png does not exist"):
        read_caption_csv(missing, image_root=scenes.root)
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\ntrain-images/000000.png,\n")
    with pytest.raises(ValueError, match=r"empty.csv line 2 column 'caption': empty"):
        read_caption_csv(empty, image_root=scenes.root)
    with pytest.raises(FileNotFoundError, match="caption file .*nope.csv does not exist"):
        datamodule(str(tmp_path / "nope.csv"))
    with pytest.raises(ValueError, match="mixes CSV/TSV files and tar shards"):
        ImageTextDataModule(train=[str(scenes.train_csv), scenes.train_shards])


def test_tsv_is_read_with_tabs(scenes, tmp_path):
    with open(scenes.test_csv) as f:
        rows = list(csv.reader(f))
    tsv = scenes.root / "copy.tsv"
    tsv.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    table = read_caption_csv(tsv)
    assert table.captions == [r[1] for r in rows[1:]] and table.neg_images[0] == scenes.root / rows[1][3]


def test_tokenizer_contract_is_checked(scenes):
    dm = datamodule(str(scenes.train_csv), str(scenes.test_csv), data_config={**CONFIG, "tokenizer": lambda t: {"input_ids": char_tokenizer(t)}})
    with pytest.raises(TypeError, match="returned a mapping"):
        next(iter(dm.train_dataloader()))
    with pytest.raises(ValueError, match="needs a callable list\\[str\\] -> LongTensor"):
        datamodule(str(scenes.train_csv), data_config={k: v for k, v in CONFIG.items() if k != "tokenizer"})


def test_data_check_summary(scenes):
    dm = ImageTextDataModule(train=scenes.train_shards, test=str(scenes.test_csv), batch_size=8)
    dm.prepare_splits()  # what hardneg data check runs: no encoder, no tokenizer needed
    assert dm.split_sizes() == {"train": {"images": 200, "captions": 200}, "test": {"images": 60, "captions": 180}}
    summary = dm.data_summary()
    assert "train: 4 shards, 200 samples (counted), 0 incomplete" in summary
    assert "test: 60 images, 180 captions (3-3 per image" in summary
    assert dm.pk_settings() is None

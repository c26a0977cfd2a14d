"""The offline Fashion-MNIST scenes: rendering, captions, the held-out split, the negative rules, and the generator's files."""

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist
from datamodules.fashion_scenes import (
    BACKGROUND,
    CLASS_NAMES,
    COLOUR_NAMES,
    COLOURS,
    NEGATIVE_RULES,
    TEMPLATES,
    SceneItem,
    SceneSpec,
    caption,
    class_pool,
    generate_scenes,
    is_held_out,
    make_negative,
    read_specs,
    render,
    replace_attribute,
    replace_object,
    replace_relation,
    swap_attributes,
    swap_objects,
)
from tests.helpers import require_path

SNEAKER, BAG, SANDAL = 7, 8, 5


@pytest.fixture(scope="module")
def fmnist():
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    return load_fashion_mnist(DEBIAN_ROOT)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    return generate_scenes(tmp_path_factory.mktemp("scenes"), n_train=200, n_test=60, seed=0, shard_size=64, with_negatives=True)


def expected_canvas(left, right, images, size=64):
    """The rendering written out pixel by pixel: item ``(cls, colour, image)`` tints over the background."""
    out = np.zeros((size, size, 3))
    out[:] = BACKGROUND
    for (_, colour, idx), x0 in ((left, 2), (right, 34)):
        g = images[idx].astype(float) / 255
        for c in range(3):
            out[18:46, x0 : x0 + 28, c] = BACKGROUND[c] * (1 - g) + COLOURS[colour][c] * g
    return np.rint(out).astype(np.uint8)


def spec(first=(SNEAKER, "red", 0), second=(BAG, "blue", 1), relation="left"):
    return SceneSpec(SceneItem(*first), SceneItem(*second), relation)


def test_render_places_tinted_items_by_relation(fmnist):
    images = fmnist["train_images"]
    a, b = (SNEAKER, "red", 0), (BAG, "blue", 1)
    np.testing.assert_array_equal(render(spec(a, b, "left"), images), expected_canvas(a, b, images))
    np.testing.assert_array_equal(render(spec(a, b, "right"), images), expected_canvas(b, a, images))


def test_captions_and_articles():
    s = spec((SNEAKER, "red", 0), (BAG, "orange", 1))
    assert caption(s) == "a red sneaker to the left of an orange bag"
    assert caption(s, 2) == "an orange bag to the right of a red sneaker"
    assert caption(s, 3) == "a red sneaker on the left and an orange bag on the right"
    assert len({caption(s, t) for t in range(len(TEMPLATES))}) == len(TEMPLATES)


def test_held_out_rule():
    held = [(c, col) for c in range(10) for col in COLOUR_NAMES if is_held_out(c, col)]
    assert held == [(c, col) for c in range(10) for k, col in enumerate(COLOUR_NAMES) if (c + k) % 5 == 0]
    assert len(held) == 16 and all(any(is_held_out(c, col) for col in COLOUR_NAMES) for c in range(10))


def test_train_and_test_combinations_are_disjoint(scenes):
    train = read_specs(scenes.root / "train-specs.jsonl")
    test = read_specs(scenes.root / "test-specs.jsonl")
    assert len(train) == 200 and len(test) == 60
    train_combos = {c for row in train for c in row["spec"].combinations()}
    assert not any(is_held_out(*c) for c in train_combos)
    # train negatives do not leak a held-out combination either
    assert not any(is_held_out(*c) for row in train if row["neg_spec"] for c in row["neg_spec"].combinations())
    for row in test:
        assert any(is_held_out(*c) for c in row["spec"].combinations())
    assert not {row["spec"] for row in test} & {row["spec"] for row in train}
    for row in train + test:  # two different objects of two different colours
        s = row["spec"]
        assert s.first.cls != s.second.cls and s.first.colour != s.second.colour


def test_train_scenes_use_train_images_and_test_scenes_test_images(scenes, fmnist):
    for split in ("train", "test"):
        rows = read_specs(scenes.root / f"{split}-specs.jsonl")
        for row in rows[:10]:
            s = row["spec"]
            img = np.asarray(Image.open(scenes.root / f"{split}-images" / f"{row['key']}.png"))
            left, right = [(it.cls, it.colour, it.image) for it in (s.left, s.right)]
            np.testing.assert_array_equal(img, expected_canvas(left, right, fmnist[f"{split}_images"]))
            assert fmnist[f"{split}_labels"][s.first.image] == s.first.cls and fmnist[f"{split}_labels"][s.second.image] == s.second.cls


def test_swap_objects_caption_and_image_are_the_swapped_scene(fmnist):
    images, rng = fmnist["train_images"], np.random.default_rng(0)
    s = spec((SNEAKER, "red", 0), (BAG, "blue", 1))
    neg = swap_objects(s, rng, class_pool(fmnist["train_labels"]))
    assert caption(neg) == "a red bag to the left of a blue sneaker"
    # the bag's own image, tinted red, now on the left; the sneaker's, tinted blue, on the right
    np.testing.assert_array_equal(render(neg, images), expected_canvas((BAG, "red", 1), (SNEAKER, "blue", 0), images))


def test_the_other_rules_do_what_they_say(fmnist):
    images, labels = fmnist["train_images"], fmnist["train_labels"]
    pool = class_pool(labels)
    sneaker, bag = int(pool[SNEAKER][0]), int(pool[BAG][0])
    s = spec((SNEAKER, "red", sneaker), (BAG, "blue", bag))
    rng = np.random.default_rng(0)
    neg = swap_attributes(s, rng, pool)
    assert caption(neg) == "a blue sneaker to the left of a red bag"
    np.testing.assert_array_equal(render(neg, images), expected_canvas((SNEAKER, "blue", sneaker), (BAG, "red", bag), images))
    neg = replace_relation(s, rng, pool)
    assert caption(neg) == "a red sneaker to the right of a blue bag"
    np.testing.assert_array_equal(render(neg, images), expected_canvas((BAG, "blue", bag), (SNEAKER, "red", sneaker), images))
    for seed in range(20):
        neg = replace_object(s, np.random.default_rng(seed), pool)
        changed = [(a, b) for a, b in ((s.first, neg.first), (s.second, neg.second)) if a != b]
        assert len(changed) == 1 and neg.relation == s.relation
        old, new = changed[0]
        assert new.colour == old.colour and new.cls not in (SNEAKER, BAG) and labels[new.image] == new.cls
        neg = replace_attribute(s, np.random.default_rng(seed), pool)
        changed = [(a, b) for a, b in ((s.first, neg.first), (s.second, neg.second)) if a != b]
        assert len(changed) == 1 and changed[0][1].cls == changed[0][0].cls and changed[0][1].image == changed[0][0].image
        assert changed[0][1].colour not in ("red", "blue")


def test_make_negative_respects_allowed_and_custom_rules(fmnist):
    pool = class_pool(fmnist["train_labels"])
    s = spec((SNEAKER, "red", 0), (BAG, "blue", 1))
    only_relation = make_negative(s, np.random.default_rng(0), pool, {"mine": replace_relation})
    assert only_relation == ("mine", replace_relation(s, None, pool))
    never = make_negative(s, np.random.default_rng(0), pool, {"swap": swap_objects}, allowed=lambda c, col: False)
    assert never is None
    for seed in range(30):
        name, neg = make_negative(s, np.random.default_rng(seed), pool, NEGATIVE_RULES, allowed=lambda c, col: col != "green")
        assert neg != s and all(col != "green" for _, col in neg.combinations())


def test_written_negatives_are_renderings_of_the_negative_spec(scenes, fmnist):
    rows = {r["key"]: r for r in read_specs(scenes.root / "train-specs.jsonl")}
    assert sum(r["neg_spec"] is not None for r in rows.values()) >= 190
    seen_rules = set()
    with tarfile.open(str(scenes.root / "train-000000.tar")) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in sorted(rows)[:64]:
        row = rows[key]
        if row["neg_spec"] is None:
            assert f"{key}.neg_caption" not in members
            continue
        seen_rules.add(row["rule"])
        neg_img = np.asarray(Image.open(io.BytesIO(members[f"{key}.neg_image.png"])))
        np.testing.assert_array_equal(neg_img, render(row["neg_spec"], fmnist["train_images"]))
        pos, negc = members[f"{key}.txt"].decode(), members[f"{key}.neg_caption"].decode()
        template = next(t for t in range(len(TEMPLATES)) if caption(row["spec"], t) == pos)
        assert negc == caption(row["neg_spec"], template) != pos
        if row["rule"] in ("swap_objects", "swap_attributes", "replace_relation"):  # rng-free rules: recompute them
            assert row["neg_spec"] == NEGATIVE_RULES[row["rule"]](row["spec"], None, {})
    assert seen_rules == set(NEGATIVE_RULES)


def test_csv_has_several_captions_per_test_image(scenes):
    with open(scenes.test_csv) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "caption", "neg_caption", "neg_image"]
    by_image = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r["caption"])
    assert len(by_image) == 60 and all(len(c) == 3 and len(set(c)) == 3 for c in by_image.values())
    assert all((scenes.root / p).is_file() for p in by_image)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generation_is_deterministic_per_seed_and_idempotent(tmp_path):
    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    kw = dict(n_train=30, n_test=10, shard_size=16, with_negatives=True)
    a = generate_scenes(tmp_path / "a", seed=3, **kw)
    b = generate_scenes(tmp_path / "b", seed=3, **kw)
    c = generate_scenes(tmp_path / "c", seed=4, **kw)
    assert _files(a.root) == _files(b.root)
    assert _files(a.root)["train.csv"] != _files(c.root)["train.csv"]
    assert a.train_shards == str(tmp_path / "a" / "train-{000000..000001}.tar")
    # same parameters: nothing is rewritten
    stamp = {p: p.stat().st_mtime_ns for p in a.root.rglob("*")}
    assert generate_scenes(tmp_path / "a", seed=3, **kw) == a
    assert {p: p.stat().st_mtime_ns for p in a.root.rglob("*")} == stamp
    # other parameters: rebuilt, and the shards of the old layout are gone
    generate_scenes(tmp_path / "a", seed=3, **{**kw, "shard_size": 64})
    assert sorted(p.name for p in a.root.glob("*.tar")) == ["test-000000.tar", "train-000000.tar"]
    # an interrupted build leaves no manifest: the next call rebuilds
    (a.root / "scenes.json").unlink()
    (a.root / "train.csv").write_text("broken")
    generate_scenes(tmp_path / "a", seed=3, **kw)
    assert _files(a.root) == _files(b.root)
    assert not list(a.root.glob(".scenes-build-*"))


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown negative rule.*swap_everything"):
        generate_scenes(tmp_path, n_train=2, n_test=2, with_negatives=True, rules=["swap_everything"])
    with pytest.raises(ValueError, match="captions_per_test_image"):
        generate_scenes(tmp_path, n_train=2, n_test=2, captions_per_test_image=9)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        generate_scenes(tmp_path, n_train=2, n_test=2, fashion_mnist_root=str(tmp_path / "none"))
    with pytest.raises(ValueError, match="relation"):
        SceneSpec(SceneItem(0, "red", 0), SceneItem(1, "blue", 1), "above")
    assert CLASS_NAMES[SNEAKER] == "sneaker" and CLASS_NAMES[BAG] == "bag" and CLASS_NAMES[SANDAL] == "sandal"


def test_scenes_datamodule_writes_once_and_reads_shards_and_csv(tmp_path):
    from datamodules import FashionScenesDataModule
    from tests.datamodules.test_image_text import CONFIG

    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    for fmt in ("shards", "csv"):
        dm = FashionScenesDataModule(root=str(tmp_path / "scenes"), n_train=40, n_test=10, shard_size=16, train_format=fmt, batch_size=4,
                                     num_workers=0, data_config=CONFIG, zero_shot_size=20)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (4, 3, 32, 32) and batch["text"].shape[0] == 4
        assert len(dm.test_dataset.captions) == 30 and dm.zero_shot_classes is not None
    manifest = (tmp_path / "scenes" / "scenes.json").stat().st_mtime
    FashionScenesDataModule(root=str(tmp_path / "scenes"), n_train=40, n_test=10, shard_size=16).prepare_data()
    assert (tmp_path / "scenes" / "scenes.json").stat().st_mtime == manifest  # same parameters: not rewritten

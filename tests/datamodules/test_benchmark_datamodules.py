"""CUB-200-2011, Cars196, SOP and In-Shop DataModules on miniature copies of their official formats.

Every bad-input case fails at ``setup()`` with a message that names the file (and line) or image.
"""

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.io import savemat

from datamodules import (
    CUB200DataModule,
    Cars196DataModule,
    DatasetFormatError,
    InShopDataModule,
    SOPDataModule,
)
from tests.datamodules.miniature import make_cars, make_cub, make_inshop, make_sop

FAST = {"num_workers": 0, "image_size": 32, "classes_per_batch": 2, "samples_per_class": 2, "eval_batch_size": 7}
CASES = {
    "cub": (CUB200DataModule, make_cub),
    "cars": (Cars196DataModule, make_cars),
    "sop": (SOPDataModule, make_sop),
    "inshop": (InShopDataModule, make_inshop),
}


def build(name, tmp_path, **kwargs):
    cls, make = CASES[name]
    args = make(tmp_path)
    dm = cls(**{**args, **FAST, **kwargs})
    return dm, args


# ------------------------------------------------------------------------------------- happy path
@pytest.mark.parametrize("name", CASES)
def test_splits_labels_and_loaders(name, tmp_path):
    dm, args = build(name, tmp_path)
    dm.setup()
    train, test = dm.train_dataset.labels, dm.test_dataset.labels
    n_train, n_test = args["num_train_classes"], args["num_test_classes"]
    # Train labels are 0..C-1 (what proxy losses index); test labels are disjoint from them.
    assert sorted(set(train.tolist())) == list(range(n_train))
    assert len(set(test.tolist())) == n_test and not set(train.tolist()) & set(test.tolist())
    assert len(dm.train_dataset.class_ids) == len(train)
    item = dm.train_dataset[0]
    x, y = item["image"], item["label"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    batch = next(iter(dm.train_dataloader()))
    xb, yb = batch["image"], batch["label"]
    assert xb.shape == (4, 3, 32, 32) and sorted(np.bincount(yb.numpy()).tolist())[-2:] == [2, 2]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape[1:] == (3, 32, 32) and batch["index"].tolist() == list(range(len(batch["image"])))
    sizes = dm.split_sizes()
    assert sizes["train"] == {"images": len(train), "classes": n_train}


def test_cub_class_ids_follow_classes_txt(tmp_path):
    dm, _ = build("cub", tmp_path)
    dm.setup()
    assert set(dm.train_dataset.class_ids.tolist()) == {1, 2, 3, 4}
    assert set(dm.test_dataset.class_ids.tolist()) == {5, 6, 7, 8}
    np.testing.assert_array_equal(dm.train_dataset.labels, dm.train_dataset.class_ids - 1)
    assert dm.recall_ks == (1, 2, 4, 8) and dm.eval_protocol == "self"


def test_cub_crop_to_bounding_boxes(tmp_path):
    dm, _ = build("cub", tmp_path, crop_to_bbox=True)
    dm.setup()
    # miniature boxes are (2 + j, 3, 24 + j, 20) for the j-th image of a class
    assert dm.train_dataset.load(0).size == (24, 20)
    assert dm.train_dataset.load(1).size == (25, 20)


def test_cars_split_by_class_and_boxes(tmp_path):
    dm, _ = build("cars", tmp_path, crop_to_bbox=True)
    dm.setup()
    assert set(dm.train_dataset.class_ids.tolist()) == {1, 2, 3, 4}
    assert set(dm.test_dataset.class_ids.tolist()) == {5, 6, 7, 8}
    assert all(p.parent.name == "car_ims" for p in dm.train_dataset.paths)
    x1 = 3  # first image of class 1: box x1=3, y1=2, x2=40, y2=28
    assert dm.train_dataset.load(0).size == (40 - x1, 28 - 2)


def test_sop_keeps_super_classes_and_protocol(tmp_path):
    dm, _ = build("sop", tmp_path)
    dm.setup()
    assert dm.train_dataset.super_labels.tolist()[:3] == [1, 1, 1]
    assert set(dm.test_dataset.super_labels.tolist()) == {7, 8, 9, 10, 11, 12}
    assert dm.recall_ks == (1, 10, 100, 1000) and dm.eval_protocol == "self"
    assert min(dm.test_dataset.class_ids) == 7


def test_inshop_query_gallery(tmp_path):
    dm, args = build("inshop", tmp_path)
    dm.setup()
    assert dm.eval_protocol == "query_gallery" and dm.recall_ks == (1, 10, 20, 30, 40, 50)
    q, g = dm.query_dataset, dm.gallery_dataset
    assert len(q) == len(g) == 10
    # the same item has the same label in query and gallery
    for item in set(q.class_ids.tolist()):
        assert set(q.labels[q.class_ids == item].tolist()) == set(g.labels[g.class_ids == item].tolist())
    assert dm.test_dataset.is_query.tolist() == [True] * 10 + [False] * 10
    batch = next(iter(dm.test_dataloader()))
    x, is_query = batch["image"], batch["is_query"]
    assert x.shape == (7, 3, 32, 32) and is_query.dtype == torch.bool and bool(is_query.all())
    sizes = dm.split_sizes()
    assert sizes["query"] == {"images": 10, "classes": 5} and sizes["gallery"] == {"images": 10, "classes": 5}


def test_inshop_eval_loader_is_sharded_under_ddp(tmp_path):
    dm, _ = build("inshop", tmp_path)
    dm.setup()
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, lightning_module=None)
        for batch in dm.test_dataloader():
            seen += list(zip(batch["index"].tolist(), batch["is_query"].tolist()))
    dm.trainer = None
    assert sorted(set(seen)) == [(i, i < 10) for i in range(20)]


def test_val_class_fraction_holds_out_train_classes(tmp_path):
    dm, _ = build("cub", tmp_path, val_class_fraction=0.25)
    dm.setup()
    assert set(dm.train_dataset.labels.tolist()) == {0, 1, 2}
    assert set(dm.val_dataset.labels.tolist()) == {3} and dm.val_dataset.class_ids.tolist() == [4] * 4
    assert dm.val_dataset is not dm.test_dataset
    assert dm.val_dataset.transform is not dm.train_dataset.transform


def test_root_may_be_the_archive_folder_or_its_parent(tmp_path):
    args = make_sop(tmp_path)
    inner = SOPDataModule(**{**args, "root": str(tmp_path / "Stanford_Online_Products")}, **FAST)
    inner.setup()
    assert len(inner.train_dataset) == 18


# ------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("name", CASES)
def test_missing_root(name, tmp_path):
    cls, make = CASES[name]
    args = make(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"root {re.escape(str(missing))} does not exist; expected"):
        cls(**{**args, "root": str(missing)}, **FAST).setup()


@pytest.mark.parametrize(
    "name, relative",
    [
        ("cub", "CUB_200_2011/image_class_labels.txt"),
        ("cub", "CUB_200_2011/classes.txt"),
        ("cars", "cars_annos.mat"),
        ("sop", "Stanford_Online_Products/Ebay_test.txt"),
        ("inshop", "list_eval_partition.txt"),
    ],
)
def test_missing_metadata_file(name, relative, tmp_path):
    dm, _ = build(name, tmp_path)
    (tmp_path / relative).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(Path(relative).name) + ".* missing"):
        dm.setup()


def test_cub_bounding_boxes_needed_only_for_cropping(tmp_path):
    dm, _ = build("cub", tmp_path, crop_to_bbox=True)
    (tmp_path / "CUB_200_2011/bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="bounding_boxes.txt"):
        dm.setup()
    build("cub", tmp_path / "again")[0].setup()


def _replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, relative, number, text",
    [
        ("cub", "CUB_200_2011/images.txt", 3, "three 001.Black_footed_Albatross/x.jpg"),
        ("cub", "CUB_200_2011/image_class_labels.txt", 5, "5"),
        ("cub", "CUB_200_2011/classes.txt", 2, "two 002.Laysan_Albatross"),
        ("cub", "CUB_200_2011/bounding_boxes.txt", 4, "4 1.0 2.0 wide 3.0"),
        ("sop", "Stanford_Online_Products/Ebay_train.txt", 4, "3 1 bicycle_final/x.JPG"),
        ("sop", "Stanford_Online_Products/Ebay_test.txt", 1, "id class super path"),
        ("inshop", "list_eval_partition.txt", 6, "img/MEN/Denim/id_00000007/01_4_full.jpg id_00000007 validation"),
        ("inshop", "list_eval_partition.txt", 2, "image item status"),
        ("inshop", "list_eval_partition.txt", 1, "many"),
    ],
)
def test_line_that_does_not_parse(name, relative, number, text, tmp_path):
    dm, _ = build(name, tmp_path, crop_to_bbox=True) if name == "cub" else build(name, tmp_path)
    path = tmp_path / relative
    _replace_line(path, number, text)
    with pytest.raises(DatasetFormatError, match=f"{re.escape(str(path))} line {number}: expected"):
        dm.setup()


def test_inshop_count_line_must_match(tmp_path):
    dm, _ = build("inshop", tmp_path)
    path = tmp_path / "list_eval_partition.txt"
    path.write_text(path.read_text().rstrip("\n").rsplit("\n", 1)[0] + "\n")  # drop the last image
    with pytest.raises(DatasetFormatError, match="line 1 announces 44 images but the file lists 43"):
        dm.setup()


def test_cub_cross_file_ids(tmp_path):
    dm, _ = build("cub", tmp_path)
    path = tmp_path / "CUB_200_2011/image_class_labels.txt"
    _replace_line(path, 2, "2 99")
    with pytest.raises(DatasetFormatError, match=f"{re.escape(str(path))} line 2: class_id 99 is not in classes.txt"):
        dm.setup()


def test_repeated_image_id(tmp_path):
    dm, _ = build("sop", tmp_path)
    path = tmp_path / "Stanford_Online_Products/Ebay_train.txt"
    _replace_line(path, 3, "1 1 1 bicycle_final/111085122837_1.JPG")
    with pytest.raises(DatasetFormatError, match="Ebay_train.txt line 3: image_id 1 repeats line 2"):
        dm.setup()


def _write_cars_annos(root: Path, records: list[dict], n_classes: int = 8) -> None:
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    ann = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for i, r in enumerate(records):
        ann[0, i] = tuple(np.array([r[f]]) if f == "relative_im_path" else np.array([[r[f]]]) for f in fields)
    names = np.empty((1, n_classes), dtype=object)
    for c in range(n_classes):
        names[0, c] = np.array([f"car {c}"])
    savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names})


def _cars_records(root: Path) -> list[dict]:
    from scipy.io import loadmat

    ann = np.atleast_1d(loadmat(str(root / "cars_annos.mat"), squeeze_me=True)["annotations"])
    return [{f: ann[i][f] for f in ann.dtype.names} for i in range(len(ann))]


def test_cars_annotation_that_does_not_parse(tmp_path):
    dm, _ = build("cars", tmp_path)
    records = _cars_records(tmp_path)
    records[2]["class"] = 2.5
    _write_cars_annos(tmp_path, records)
    with pytest.raises(DatasetFormatError, match=r"cars_annos.mat annotations\(3\).class is 2.5; expected an integer"):
        dm.setup()


def test_cars_class_outside_the_split(tmp_path):
    dm, _ = build("cars", tmp_path)
    records = _cars_records(tmp_path)
    records[5]["class"] = 9
    _write_cars_annos(tmp_path, records)
    with pytest.raises(DatasetFormatError, match=r"annotations\(6\).class is 9; expected 1..8"):
        dm.setup()


def test_cars_not_a_mat_file(tmp_path):
    dm, _ = build("cars", tmp_path)
    (tmp_path / "cars_annos.mat").write_bytes(b"this is not MATLAB")
    with pytest.raises(DatasetFormatError, match="cars_annos.mat is not a readable MATLAB .mat file"):
        dm.setup()


def test_cars_struct_without_a_field(tmp_path):
    dm, _ = build("cars", tmp_path)
    savemat(str(tmp_path / "cars_annos.mat"), {"annotations": np.zeros((1, 2), dtype=[("relative_im_path", "O")])})
    with pytest.raises(DatasetFormatError, match=r"has no field\(s\) \['class'\]"):
        dm.setup()


@pytest.mark.parametrize(
    "name, relative, source",
    [
        ("cub", "CUB_200_2011/images/003.Sooty_Albatross/Sooty_Albatross_0002_1010.jpg", r"images.txt line 10"),
        ("cars", "car_ims/000011.jpg", r"cars_annos.mat annotations\(11\)"),
        ("sop", "Stanford_Online_Products/chair_final/111085122911_1.JPG", r"Ebay_train.txt line 9"),
        ("inshop", "img/MEN/Denim/id_00000007/01_2_side.jpg", r"list_eval_partition.txt line 4"),
    ],
)
def test_image_listed_but_absent(name, relative, source, tmp_path):
    dm, _ = build(name, tmp_path)
    (tmp_path / relative).unlink()
    with pytest.raises(FileNotFoundError, match=f"1 listed images are absent: {re.escape(str(tmp_path / relative))} \\(listed in .*{source}\\)"):
        dm.setup()


@pytest.mark.parametrize("name", CASES)
def test_corrupt_image_lazily_and_with_verify(name, tmp_path):
    dm, _ = build(name, tmp_path)
    dm.setup()
    path = dm.train_dataset.paths[1]
    path.write_bytes(path.read_bytes()[:60])  # a truncated JPEG
    with pytest.raises(OSError, match=f"cannot read image {re.escape(str(path))}"):
        dm.train_dataset[1]
    dm.train_dataset[0]  # the others still load
    eager, _ = build(name, tmp_path / "eager", verify=True)
    bad = sorted((tmp_path / "eager").rglob("*.[jJ][pP][gG]"))[-1]
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(OSError, match=f"1 unreadable images: cannot read image {re.escape(str(bad))}"):
        eager.setup()


@pytest.mark.parametrize("name", CASES)
def test_class_counts_must_match_the_split(name, tmp_path):
    cls, make = CASES[name]
    args = make(tmp_path)
    args.pop("num_train_classes"), args.pop("num_test_classes")  # the real benchmark's defaults
    with pytest.raises(DatasetFormatError, match="expected .*num_train_classes.*pass num_train_classes"):
        cls(**args, **FAST).setup()


def test_class_count_message_names_the_split(tmp_path):
    dm, _ = build("sop", tmp_path, num_test_classes=7)
    with pytest.raises(DatasetFormatError, match="the test split has 6 classes; expected 7 \\(num_test_classes=7\\)"):
        dm.setup()
    dm, _ = build("inshop", tmp_path / "inshop", num_test_classes=4)
    with pytest.raises(DatasetFormatError, match="the query split has 5 classes; expected 4"):
        dm.setup()
    # a class with no image leaves its split short even though classes.txt is complete
    dm, _ = build("cub", tmp_path / "cub")
    labels = tmp_path / "cub/CUB_200_2011/image_class_labels.txt"
    labels.write_text(labels.read_text().replace(" 2\n", " 1\n"))
    with pytest.raises(DatasetFormatError, match="the train split has 3 classes; expected 4"):
        dm.setup()


def test_sop_train_and_test_classes_must_be_disjoint(tmp_path):
    dm, _ = build("sop", tmp_path)
    path = tmp_path / "Stanford_Online_Products/Ebay_test.txt"
    lines = path.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = "1"
    lines[1] = " ".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match="Ebay_test.txt line 2: class_id 1 is also a train class"):
        dm.setup()


def test_failed_setup_checks_again_next_time(tmp_path):
    dm, _ = build("sop", tmp_path, num_test_classes=7)  # the train split is built before the test check
    with pytest.raises(DatasetFormatError, match="the test split has 6 classes; expected 7"):
        dm.setup()
    assert dm.train_dataset is None
    with pytest.raises(DatasetFormatError):
        dm.setup()

"""SugarCrepe / SugarCrepe++ scores against loops written from the authors' evaluation code and
hand-built cases, and the JSON readers on miniature copies of both releases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.metadata import DatasetFormatError
from datamodules.sugarcrepe import (
    SUGARCREPE_CATEGORIES,
    SUGARCREPE_PP_CATEGORIES,
    SugarCrepePPSample,
    SugarCrepeSample,
    read_sugarcrepe,
    read_sugarcrepe_pp,
)
from lightning_modules.metrics.compositional import (
    negative_image_accuracy,
    pairwise_correct,
    sugarcrepe_accuracy,
    sugarcrepe_pp_scores,
)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def samples(seed: int, n: int = 200, dim: int = 8, parts: int = 4) -> list[torch.Tensor]:
    """``parts`` embedding sets of n rows that are related (so accuracy is informative), with varied norms."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, dim))
    out = [base * rng.uniform(0.3, 4.0, (n, 1)) + 1.3 * rng.normal(size=(n, dim)) for _ in range(parts)]
    return [torch.from_numpy(x) for x in out]


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_sugarcrepe_and_negative_image_accuracy_match_a_loop(seed: int) -> None:
    image, caption, negative = samples(seed, parts=3)
    negative = negative + 0.8 * (caption - image)  # negatives somewhat off the image: accuracy above chance
    expected = np.mean([cos(i, p) > cos(i, n) for i, p, n in zip(image.numpy(), caption.numpy(), negative.numpy())])
    ours = sugarcrepe_accuracy(image, caption, negative)
    assert ours == expected and 0.05 < ours < 0.95
    assert sugarcrepe_accuracy(image.numpy(), caption.float(), negative.numpy()) == ours  # arrays, tensors, dtypes
    # the text -> image direction: the anchor is the caption
    expected_t2i = np.mean([cos(t, i) > cos(t, n) for t, i, n in zip(caption.numpy(), image.numpy(), negative.numpy())])
    assert negative_image_accuracy(caption, image, negative) == expected_t2i


def test_scores_are_cosine_so_rescaling_a_row_changes_nothing() -> None:
    image, caption, negative = samples(3, parts=3)
    scale = torch.from_numpy(np.random.default_rng(0).uniform(0.01, 100.0, (len(image), 1)))
    assert sugarcrepe_accuracy(image * scale, caption / scale, negative * scale**2) == sugarcrepe_accuracy(image, caption, negative)


def test_a_tie_is_wrong() -> None:
    image, caption, negative = samples(4, parts=3)
    # rows 0-9: the negative is the caption itself; rows 10-19: a copy rescaled by a power of two
    # (exactly the same unit vector, so exactly the same cosine)
    negative[:10] = caption[:10]
    negative[10:20] = 4.0 * caption[10:20]
    correct = pairwise_correct(image, caption, negative)
    assert not correct[:20].any()
    assert sugarcrepe_accuracy(image[:20], caption[:20], negative[:20]) == 0.0
    assert negative_image_accuracy(caption[:20], image[:20], 2.0 * image[:20]) == 0.0
    # strict in both directions: swapping caption and negative of a tie is still wrong
    assert sugarcrepe_accuracy(image[:20], negative[:20], caption[:20]) == 0.0


def test_sugarcrepe_pp_itt_and_tot_differ_on_a_hand_built_case() -> None:
    e0 = [1.0, 0.0, 0.0]
    # A: both captions beat the negative for the image (ITT right), but P2 is closer to N than to P1 (TOT wrong)
    a = {"img": e0, "p1": e0, "p2": [1.0, 1.0, 0.0], "neg": [0.5, 1.0, 0.0]}
    # B: the negative beats P1 for the image (ITT wrong), yet P1 and P2 are each other's nearest (TOT right)
    b = {"img": e0, "p1": [0.0, 1.0, 0.0], "p2": [0.0, 1.0, 0.1], "neg": [1.0, 0.0, 0.2]}
    # C: P2 is the negative: ties everywhere, both wrong
    c = {"img": e0, "p1": [1.0, 0.2, 0.0], "p2": [0.3, 1.0, 0.0], "neg": [0.3, 1.0, 0.0]}

    def score(*cases: dict) -> dict[str, float]:
        t = {key: torch.tensor([case[key] for case in cases]) for key in ("img", "p1", "p2", "neg")}
        return sugarcrepe_pp_scores(t["img"], t["p1"], t["p2"], t["neg"])

    assert score(a) == {"itt": 1.0, "tot": 0.0}
    assert score(b) == {"itt": 0.0, "tot": 1.0}
    assert score(c) == {"itt": 0.0, "tot": 0.0}
    assert score(a, b, c) == {"itt": 1 / 3, "tot": 1 / 3}


@pytest.mark.parametrize("seed", (0, 1))
def test_sugarcrepe_pp_matches_the_authors_comparisons(seed: int) -> None:
    image, p1, p2, neg = samples(seed, parts=4)
    p2 = p2 + p1  # the two positives related, so TOT is informative
    itt, tot = [], []
    for i, a, b, n in zip(image.numpy(), p1.numpy(), p2.numpy(), neg.numpy()):
        itt.append(cos(i, a) > cos(i, n) and cos(i, b) > cos(i, n))
        tot.append(cos(a, b) > cos(a, n) and cos(a, b) > cos(b, n))
    ours = sugarcrepe_pp_scores(image, p1, p2, neg)
    assert ours == {"itt": np.mean(itt), "tot": np.mean(tot)}
    assert ours["itt"] != ours["tot"] and 0.05 < ours["tot"] < 0.95


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.ones(4, 3), torch.ones(4, 3), torch.ones(5, 3)), r"negative_caption_emb has shape \(5, 3\) but image_emb has \(4, 3\)"),
        ((torch.ones(4, 3), torch.ones(4, 2), torch.ones(4, 3)), r"caption_emb has shape \(4, 2\)"),
        ((torch.ones(4), torch.ones(4), torch.ones(4)), r"image_emb must be .*\[N, D\]"),
        ((torch.ones(2, 3), torch.tensor([[1.0, 0, 0], [float("nan"), 0, 0]]), torch.ones(2, 3)), r"caption_emb has NaN or Inf in rows \[1\]"),
    ],
)
def test_bad_input_raises_a_clear_error(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sugarcrepe_accuracy(*args)


def test_sugarcrepe_pp_names_the_bad_argument() -> None:
    with pytest.raises(ValueError, match=r"caption2_emb has shape \(3, 3\)"):
        sugarcrepe_pp_scores(torch.ones(4, 3), torch.ones(4, 3), torch.ones(3, 3), torch.ones(4, 3))


# ------------------------------------------------------------------------------------------------
# readers


def write_sugarcrepe(folder: Path, images: Path, categories=SUGARCREPE_CATEGORIES, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for c, category in enumerate(categories):
        data = {}
        for i in range(n):
            name = f"{c * 100 + i:012d}.jpg"
            (images / name).write_bytes(b"")
            data[str(i)] = {"filename": name, "caption": f"{category} caption {i}", "negative_caption": f"{category} negative {i}"}
        (folder / f"{category}.json").write_text(json.dumps(data, indent=4))


def write_sugarcrepe_pp(folder: Path, images: Path, categories=SUGARCREPE_PP_CATEGORIES, n: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    for c, category in enumerate(categories):
        records = []
        for i in range(n):
            name = f"{c * 100 + i:012d}.jpg"
            (images / name).write_bytes(b"")
            records.append({"id": i, "filename": name, "caption": f"p1 {i}", "caption2": f"p2 {i}", "negative_caption": f"n {i}"})
        (folder / f"{category}.json").write_text(json.dumps(records, indent=1))


def test_read_sugarcrepe_all_categories(tmp_path: Path) -> None:
    write_sugarcrepe(tmp_path / "data", tmp_path / "val2017")
    out = read_sugarcrepe(tmp_path / "data", tmp_path / "val2017")
    assert tuple(out) == SUGARCREPE_CATEGORIES
    assert all(len(rows) == 3 for rows in out.values())
    first = out["swap_att"][1]
    assert first == SugarCrepeSample(
        id="1", category="swap_att", filename="000000000501.jpg", image=tmp_path / "val2017" / "000000000501.jpg",
        caption="swap_att caption 1", negative_caption="swap_att negative 1",
    )
    only = read_sugarcrepe(str(tmp_path / "data"), str(tmp_path / "val2017"), categories=("add_obj",))
    assert list(only) == ["add_obj"]


def test_read_sugarcrepe_accepts_the_early_ent_file_names(tmp_path: Path) -> None:
    write_sugarcrepe(tmp_path / "data", tmp_path / "val2017")
    (tmp_path / "data" / "swap_obj.json").rename(tmp_path / "data" / "swap_ent.json")
    out = read_sugarcrepe(tmp_path / "data", tmp_path / "val2017", categories=("swap_obj",))
    assert [s.caption for s in out["swap_obj"]] == ["swap_obj caption 0", "swap_obj caption 1", "swap_obj caption 2"]
    (tmp_path / "data" / "swap_ent.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"swap_obj.json is missing \(nor its earlier name swap_ent.json\)"):
        read_sugarcrepe(tmp_path / "data", tmp_path / "val2017")


def test_read_sugarcrepe_errors_name_the_file_and_record(tmp_path: Path) -> None:
    data, images = tmp_path / "data", tmp_path / "val2017"
    write_sugarcrepe(data, images)
    path = data / "replace_rel.json"
    records = json.loads(path.read_text())
    del records["2"]["negative_caption"]
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"replace_rel.json: record '2' has no field negative_caption"):
        read_sugarcrepe(data, images)
    records["2"]["negative_caption"] = 7
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"replace_rel.json: record '2': field negative_caption is 7; expected a non-empty string"):
        read_sugarcrepe(data, images)
    path.write_text('{\n  "0": {"filename": "a.jpg",\n}')
    with pytest.raises(DatasetFormatError, match=r"replace_rel.json line 3 column 1: not valid JSON"):
        read_sugarcrepe(data, images)
    path.write_text("[]")
    with pytest.raises(DatasetFormatError, match=r"the top level is a JSON list; expected an object"):
        read_sugarcrepe(data, images)
    with pytest.raises(FileNotFoundError, match="SugarCrepe root .* does not exist"):
        read_sugarcrepe(tmp_path / "nowhere", images)
    with pytest.raises(ValueError, match="categories must be a non-empty subset"):
        read_sugarcrepe(data, images, categories=("add_ent",))


def test_missing_images_are_counted_and_the_first_named(tmp_path: Path) -> None:
    data, images = tmp_path / "data", tmp_path / "val2017"
    write_sugarcrepe(data, images)
    gone = sorted(images.iterdir())[:7]
    for p in gone:
        p.unlink()
    with pytest.raises(FileNotFoundError, match=r"SugarCrepe: 7 listed images are absent: .*000000000000.jpg \(listed in add_att.json record 0\).* and 2 more"):
        read_sugarcrepe(data, images)
    assert len(read_sugarcrepe(data, images, check_images=False)["add_att"]) == 3  # text-only use
    with pytest.raises(FileNotFoundError, match="SugarCrepe image root .* does not exist; expected the MS-COCO val2017"):
        read_sugarcrepe(data, tmp_path / "no_images")


def test_read_sugarcrepe_pp(tmp_path: Path) -> None:
    data, images = tmp_path / "scpp", tmp_path / "val2017"
    write_sugarcrepe_pp(data, images)
    out = read_sugarcrepe_pp(data, images)
    assert tuple(out) == SUGARCREPE_PP_CATEGORIES
    assert out["replace_att"][2] == SugarCrepePPSample(
        id="2", category="replace_att", filename="000000000002.jpg", image=images / "000000000002.jpg",
        caption="p1 2", caption2="p2 2", negative_caption="n 2",
    )
    path = data / "swap_obj.json"
    records = json.loads(path.read_text())
    del records[1]["caption2"]
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"swap_obj.json: record 1 \(id 1\) has no field caption2"):
        read_sugarcrepe_pp(data, images)
    records[1]["caption2"] = "p2"
    records[2]["id"] = 0
    path.write_text(json.dumps(records))
    with pytest.raises(DatasetFormatError, match=r"swap_obj.json: record 2 \(id 0\): id 0 repeats record 0"):
        read_sugarcrepe_pp(data, images)
    path.write_text(json.dumps({"0": records[0]}))
    with pytest.raises(DatasetFormatError, match=r"swap_obj.json: the top level is a JSON dict; expected a list"):
        read_sugarcrepe_pp(data, images)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"swap_obj.json is missing; expected the SugarCrepe\+\+ data/ folder"):
        read_sugarcrepe_pp(data, images)
    with pytest.raises(ValueError, match="categories must be a non-empty subset"):
        read_sugarcrepe_pp(data, images, categories=("add_att",))

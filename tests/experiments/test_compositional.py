"""``hardneg compositional``, ``CompositionalReport`` and the scenes' compositional test set.

The scores are checked against a brute-force loop written here: every image and caption encoded
one at a time, cosine similarities in numpy, a strict comparison per sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datamodules.compositional_test_set import COMPOSITIONAL_TEST, generate_compositional_test, read_compositional_test
from datamodules.fashion_scenes import NEGATIVE_RULES, generate_scenes, is_held_out, read_specs
from datamodules.metadata import DatasetFormatError
from datamodules.sugarcrepe import SUGARCREPE_CATEGORIES, SUGARCREPE_PP_CATEGORIES
from experiments import compositional
from experiments.callbacks.compositional_report import CompositionalReport, merge_results

SIZE = 56


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machine two threads contend with other jobs (measured 50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(one_thread):
    """The offline CLIP at 32 px (random projections: any fixed model serves a metric test)."""
    torch.manual_seed(0)
    return compositional.load_model("lite0-minilm-clip", model_args={"image_size": 32, "context_length": 32})


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scenes")
    generate_scenes(root, n_train=40, n_test=6, seed=3, shard_size=40, with_negatives=True, image_size=SIZE)
    generate_compositional_test(root)
    return root


# ----------------------------------------------------------------------- brute-force reference
def _encode_image(model, path: Path) -> np.ndarray:
    tf = compositional.image_transform(model.data_config)
    with torch.no_grad(), Image.open(path) as img:
        return model.eval().encode_image(tf(img.convert("RGB"))[None]).double().numpy()[0]


def _encode_text(model, text: str) -> np.ndarray:
    with torch.no_grad():
        return model.eval().encode_text(model.data_config["tokenizer"]([text])).double().numpy()[0]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _wins(anchor, pos, neg) -> bool:
    return _cos(anchor, pos) > _cos(anchor, neg)


# ------------------------------------------------------------------------ the offline set
def test_compositional_set_has_one_negative_per_scene_and_category(scenes):
    samples = read_compositional_test(scenes / COMPOSITIONAL_TEST)
    assert list(samples) == list(NEGATIVE_RULES)
    specs = read_specs(scenes / "test-specs.jsonl")
    for category, rows in samples.items():
        assert len(rows) == len(specs), category  # two items of different classes and colours: every rule applies
        for row, spec in zip(rows, specs):
            assert row.image == scenes / "test-images" / f"{spec['key']}.png"
            assert row.negative_caption != row.caption
            assert row.negative_image.name == f"{spec['key']}.{category}.png"
    # the relation edit mirrors the layout: the negative image is the positive with its halves swapped
    for row in samples["replace_relation"]:
        pos, neg = np.asarray(Image.open(row.image)), np.asarray(Image.open(row.negative_image))
        assert np.array_equal(neg[:, : SIZE // 2], pos[:, SIZE // 2 :]) and np.array_equal(neg[:, SIZE // 2 :], pos[:, : SIZE // 2])
    # the attribute swap keeps the words and exchanges the two colours
    for row in samples["swap_attributes"]:
        assert sorted(row.caption.split()) == sorted(row.negative_caption.split())
    # train negatives never show a held-out combination; test scenes always show one
    for rec in read_specs(scenes / "train-specs.jsonl"):
        if rec["neg_spec"] is not None:
            assert not any(is_held_out(c, col) for c, col in rec["neg_spec"].combinations())
    assert all(any(is_held_out(c, col) for c, col in rec["spec"].combinations()) for rec in specs)


def test_compositional_set_is_deterministic_and_written_once(scenes, tmp_path):
    other = tmp_path / "again"
    generate_scenes(other, n_train=40, n_test=6, seed=3, shard_size=40, with_negatives=True, image_size=SIZE)
    generate_compositional_test(other)
    assert (other / COMPOSITIONAL_TEST).read_bytes() == (scenes / COMPOSITIONAL_TEST).read_bytes()
    for png in (scenes / "compositional-test-images").iterdir():
        assert (other / "compositional-test-images" / png.name).read_bytes() == png.read_bytes()
    mtime = (other / COMPOSITIONAL_TEST).stat().st_mtime_ns
    generate_compositional_test(other)
    assert (other / COMPOSITIONAL_TEST).stat().st_mtime_ns == mtime
    # one category alone draws the same negatives (each category has its own random stream)
    generate_compositional_test(other, ["replace_object"])
    alone = read_compositional_test(other / COMPOSITIONAL_TEST)["replace_object"]
    assert [r.negative_caption for r in alone] == [r.negative_caption for r in read_compositional_test(scenes / COMPOSITIONAL_TEST)["replace_object"]]


def test_compositional_set_errors(tmp_path, scenes):
    with pytest.raises(FileNotFoundError, match="no complete scene dataset"):
        generate_compositional_test(tmp_path)
    with pytest.raises(ValueError, match="non-empty subset"):
        generate_compositional_test(scenes, ["swap_everything"])
    with pytest.raises(FileNotFoundError, match="compositional-test.csv is missing"):
        read_compositional_test(tmp_path / COMPOSITIONAL_TEST)
    lines = (scenes / COMPOSITIONAL_TEST).read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption,category\n")
    with pytest.raises(DatasetFormatError, match="line 1: header .* lacks negative_caption, negative_image"):
        read_compositional_test(bad)
    bad.write_text("\n".join([lines[0], lines[1], lines[2].replace(lines[2].split(",")[-1], "")]) + "\n")
    with pytest.raises(DatasetFormatError, match="line 3: empty category"):
        read_compositional_test(bad)
    moved = tmp_path / "moved" / COMPOSITIONAL_TEST
    moved.parent.mkdir()
    moved.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileNotFoundError, match="36 listed images are absent"):
        read_compositional_test(moved)


# --------------------------------------------------------------------- the scores, by hand
def test_score_scenes_matches_brute_force(model, scenes):
    samples = read_compositional_test(scenes / COMPOSITIONAL_TEST)
    got = compositional.score_scenes(model, samples, compositional.image_transform(model.data_config), model.data_config["tokenizer"], batch_size=5)
    i2t_means, t2i_means = [], []
    for category, rows in samples.items():
        i2t = t2i = 0
        for r in rows:
            img, neg_img = _encode_image(model, r.image), _encode_image(model, r.negative_image)
            cap, neg_cap = _encode_text(model, r.caption), _encode_text(model, r.negative_caption)
            i2t += _wins(img, cap, neg_cap)
            t2i += _wins(cap, img, neg_img)
        assert got[f"comp_{category}"] == pytest.approx(i2t / len(rows), abs=1e-12)
        assert got[f"comp_{category}_t2i"] == pytest.approx(t2i / len(rows), abs=1e-12)
        i2t_means.append(i2t / len(rows))
        t2i_means.append(t2i / len(rows))
    assert got["comp_mean"] == pytest.approx(np.mean(i2t_means)) and got["comp_mean_t2i"] == pytest.approx(np.mean(t2i_means))


def _coco(tmp_path: Path, n: int = 4) -> Path:
    images = tmp_path / "val2017"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i:012d}.jpg")
    return images


CAPTIONS = ["a red bag on a table", "two dogs play in the park", "a man rides a horse", "a blue car next to a tree", "a cat sleeps on a sofa"]


def _sugarcrepe(tmp_path: Path) -> Path:
    data = tmp_path / "sugarcrepe"
    data.mkdir()
    for k, category in enumerate(SUGARCREPE_CATEGORIES):
        records = {str(i): {"filename": f"{(i + k) % 4:012d}.jpg", "caption": CAPTIONS[(i + k) % 5], "negative_caption": CAPTIONS[(i + k + 2) % 5]}
                   for i in range(3)}
        (data / f"{category}.json").write_text(json.dumps(records))
    return data


def _use_fixture(monkeypatch, model):
    calls = []

    def load(name=None, ckpt=None, model_config=None, model_args=None):
        calls.append((name, ckpt, dict(model_args or {})))
        return model

    monkeypatch.setattr(compositional, "load_model", load)
    return calls


def test_cli_sugarcrepe_matches_brute_force(model, tmp_path, monkeypatch, capsys):
    calls = _use_fixture(monkeypatch, model)
    data, images, out = _sugarcrepe(tmp_path), _coco(tmp_path), tmp_path / "results.json"
    out.write_text(json.dumps({"other": {"kept": True}}))
    argv = ["--model", "lite0-minilm-clip", "--model-arg", "image_size=32", "--sugarcrepe", str(data), "--coco-images", str(images),
            "--batch-size", "4", "--out", str(out)]
    assert compositional.main(argv) == 0
    assert calls == [("lite0-minilm-clip", None, {"image_size": 32})]
    result = json.loads(out.read_text())
    assert result["other"] == {"kept": True} and result["sugarcrepe"]["counts"] == {c: 3 for c in SUGARCREPE_CATEGORIES}
    metrics = result["sugarcrepe"]["metrics"]
    for k, category in enumerate(SUGARCREPE_CATEGORIES):
        wins = [_wins(_encode_image(model, images / f"{(i + k) % 4:012d}.jpg"), _encode_text(model, CAPTIONS[(i + k) % 5]),
                      _encode_text(model, CAPTIONS[(i + k + 2) % 5])) for i in range(3)]
        assert metrics[f"sugarcrepe_{category}"] == pytest.approx(np.mean(wins), abs=1e-12)
    assert metrics["sugarcrepe_mean"] == pytest.approx(np.mean([metrics[f"sugarcrepe_{c}"] for c in SUGARCREPE_CATEGORIES]))
    printed = capsys.readouterr().out
    assert "sugarcrepe: lite0-minilm-clip, 21 samples" in printed and "swap_obj" in printed and "mean" in printed


def test_cli_sugarcrepe_pp_matches_brute_force(model, tmp_path, monkeypatch):
    _use_fixture(monkeypatch, model)
    images, data, out = _coco(tmp_path), tmp_path / "scpp", tmp_path / "results.json"
    data.mkdir()
    for k, category in enumerate(SUGARCREPE_PP_CATEGORIES):
        records = [{"id": i, "filename": f"{(i + k) % 4:012d}.jpg", "caption": CAPTIONS[(i + k) % 5], "caption2": CAPTIONS[(i + k + 1) % 5],
                    "negative_caption": CAPTIONS[(i + k + 3) % 5]} for i in range(3)]
        (data / f"{category}.json").write_text(json.dumps(records))
    assert compositional.main(["--model", "x", "--sugarcrepe-pp", str(data), "--coco-images", str(images), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["sugarcrepe_pp"]["metrics"]
    for k, category in enumerate(SUGARCREPE_PP_CATEGORIES):
        itt, tot = [], []
        for i in range(3):
            img = _encode_image(model, images / f"{(i + k) % 4:012d}.jpg")
            p1, p2, n = (_encode_text(model, CAPTIONS[(i + k + d) % 5]) for d in (0, 1, 3))
            itt.append(_cos(img, p1) > _cos(img, n) and _cos(img, p2) > _cos(img, n))
            tot.append(_cos(p1, p2) > _cos(p1, n) and _cos(p1, p2) > _cos(p2, n))
        assert metrics[f"sugarcrepe_pp_{category}_itt"] == pytest.approx(np.mean(itt), abs=1e-12)
        assert metrics[f"sugarcrepe_pp_{category}_tot"] == pytest.approx(np.mean(tot), abs=1e-12)


def test_cli_scenes_and_errors(model, scenes, tmp_path, monkeypatch, capsys):
    _use_fixture(monkeypatch, model)
    out = tmp_path / "r.json"
    assert compositional.main(["--model", "x", "--scenes", str(scenes), "--categories", "swap_objects", "replace_relation", "--out", str(out)]) == 0
    assert sorted(json.loads(out.read_text())["scenes"]["counts"]) == ["replace_relation", "swap_objects"]
    generate_compositional_test(scenes)  # restore the full set for the other tests
    capsys.readouterr()
    # missing images: the reader's count and first paths
    data, images = _sugarcrepe(tmp_path), _coco(tmp_path, n=2)
    assert compositional.main(["--model", "x", "--sugarcrepe", str(data), "--coco-images", str(images)]) == 1
    assert "SugarCrepe: 2 listed images are absent" in capsys.readouterr().err
    (data / "swap_att.json").write_text("{not json")
    assert compositional.main(["--model", "x", "--sugarcrepe", str(data), "--coco-images", str(images)]) == 1
    assert "swap_att.json line 1 column 2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compositional.main(["--model", "x", "--sugarcrepe", str(data)])
    assert "need --coco-images" in capsys.readouterr().err


# --------------------------------------------------------------------------- model loading
def test_load_model_from_checkpoint(model, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    spec = {"class_path": "models.preset", "init_args": {"name": "lite0-minilm-clip", "overrides": {"image_size": 32, "context_length": 32}}}
    (run / "config.yaml").write_text(json.dumps({"model": {"init_args": {"model": spec}}}))
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    loaded = compositional.load_model(ckpt=str(ckpt))
    tokens = model.data_config["tokenizer"](["a red bag"])
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_text(tokens), model.eval().encode_text(tokens), atol=1e-6)
    with pytest.raises(compositional.CompositionalError, match="checkpoint file not found"):
        compositional.load_model(ckpt=str(run / "nope.ckpt"))
    torch.save({"state_dict": {"encoder.w": torch.zeros(1)}}, run / "other.ckpt")
    with pytest.raises(compositional.CompositionalError, match="no 'model.\\*' weights"):
        compositional.load_model(ckpt=str(run / "other.ckpt"))
    (run / "bad.yaml").write_text("model: {init_args: {}}\n")
    with pytest.raises(compositional.CompositionalError, match="model.init_args.model has no class_path"):
        compositional.load_model(ckpt=str(ckpt), model_config=str(run / "bad.yaml"))
    with pytest.raises(compositional.CompositionalError, match="no encode_image"):
        compositional.load_model("minilm-l6")


# ------------------------------------------------------------------------------- the callback
def test_callback_merges_into_results_json(model, scenes, tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"before_training": {"i2t_r@1": 0.5}, "val_before_training": None}))  # UntrainedBaseline's file
    trainer = SimpleNamespace(datamodule=SimpleNamespace(root=str(scenes)), fast_dev_run=False, is_global_zero=True, default_root_dir=str(tmp_path),
                              loggers=[], ckpt_path=None)
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    report = CompositionalReport(batch_size=7)
    report.on_test_end(trainer, module)  # a grid's baseline job: hardneg test without a checkpoint
    report.teardown(trainer, module, "test")
    data = json.loads(results.read_text())
    assert data["before_training"]["i2t_r@1"] == 0.5 and data["val_before_training"] is None
    expected = compositional.score_scenes(model, read_compositional_test(scenes / COMPOSITIONAL_TEST),
                                          compositional.image_transform(model.data_config), model.data_config["tokenizer"])
    assert {k: v for k, v in data["before_training"].items() if k.startswith("comp_")} == pytest.approx(expected)
    assert "replace_attribute" in capsys.readouterr().out
    # fit: RetrievalReport wrote after_training (with a null before); the merge keeps its keys
    results.write_text(json.dumps({"before_training": None, "after_training": {"t2i_r@1": 0.25}}))
    report.on_fit_end(trainer, module)
    report.teardown(trainer, module, "fit")
    data = json.loads(results.read_text())
    assert data["after_training"]["t2i_r@1"] == 0.25 and data["after_training"]["comp_mean"] == pytest.approx(expected["comp_mean"])
    assert data["before_training"]["comp_mean"] == pytest.approx(expected["comp_mean"])  # the test-stage scores, kept as "before"


def test_callback_errors(tmp_path):
    trainer = SimpleNamespace(datamodule=SimpleNamespace(), fast_dev_run=False, is_global_zero=True)
    with pytest.raises(ValueError, match="no scenes folder"):
        CompositionalReport().evaluate(trainer, SimpleNamespace(model=SimpleNamespace(encode_image=print, encode_text=print,
                                                                                      data_config={"tokenizer": print})))
    with pytest.raises(compositional.CompositionalError, match="no encode_image"):
        CompositionalReport(root=str(tmp_path)).evaluate(trainer, SimpleNamespace(model=torch.nn.Linear(2, 2)))
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds a JSON list; expected an object"):
        merge_results(tmp_path / "results.json", {"after_training": {"comp_mean": 1.0}})

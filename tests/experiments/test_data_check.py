"""``hardneg data check`` validates a benchmark folder from a run config or a data fragment."""

from pathlib import Path

import yaml

from experiments.cli import main
from experiments.lightning_cli import load_config
from tests.datamodules.miniature import make_cub, make_inshop
from tests.experiments.test_preflight import TINY, fit_error, no_training, small_class_cub  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[2]


def fragment(tmp_path: Path, class_path: str, init_args: dict) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump({"class_path": class_path, "init_args": init_args}))
    return path


def rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()}


def test_fragment_prints_split_sizes(tmp_path, capsys):
    # P x K must fit the miniature (4 train classes of 4 images), as fit requires
    cfg = fragment(tmp_path, "datamodules.CUB200DataModule", {**make_cub(tmp_path / "cub"), "classes_per_batch": 2})
    assert main(["data", "check", "--data", str(cfg)]) == 0
    table = rows(capsys.readouterr().out)
    assert table["train"] == ["16", "4"] and table["test"] == ["16", "4"]
    assert table["recall@K:"] == ["1,", "2,", "4,", "8"]


def test_run_config_with_overrides_and_query_gallery(tmp_path, capsys):
    args = make_inshop(tmp_path / "inshop")
    recipe = ROOT / "experiments/recipes/metrix_proxy_anchor_inshop.yaml"
    overrides = [f"--data.init_args.{k}={v}" for k, v in args.items()]
    assert main(["data", "check", "--data", str(recipe), *overrides]) == 1  # 20 classes a batch, 6 in the miniature
    assert "data.init_args.classes_per_batch: a batch draws 20 distinct classes" in capsys.readouterr().err
    assert main(["data", "check", "--data", str(recipe), *overrides, "--data.init_args.classes_per_batch=2"]) == 0
    table = rows(capsys.readouterr().out)
    assert table["train"] == ["24", "6"] and table["query"] == ["10", "5"] and table["gallery"] == ["10", "5"]


def test_failures_exit_1_with_the_datamodule_message(tmp_path, capsys):
    args = make_cub(tmp_path / "cub")
    cfg = fragment(tmp_path, "datamodules.CUB200DataModule", {**args, "root": str(tmp_path / "missing")})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert f"root {tmp_path / 'missing'} does not exist" in capsys.readouterr().err
    # the real class counts (defaults) do not fit a miniature copy
    cfg = fragment(tmp_path, "datamodules.CUB200DataModule", {"root": args["root"]})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert "classes.txt lists 8 classes; expected num_train_classes + num_test_classes = 100 + 100" in capsys.readouterr().err
    assert main(["data", "check", "--data", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml does not exist" in capsys.readouterr().err
    no_data = tmp_path / "run.yaml"
    no_data.write_text("trainer: {max_epochs: 1}\n")
    assert main(["data", "check", "--data", str(no_data)]) == 1
    assert "has no DataModule" in capsys.readouterr().err


def test_verify_decodes_every_image(tmp_path, capsys):
    args = make_cub(tmp_path / "cub")
    bad = sorted((tmp_path / "cub").rglob("*.jpg"))[5]
    bad.write_bytes(b"\xff\xd8 truncated")
    cfg = fragment(tmp_path, "datamodules.CUB200DataModule", {**args, "classes_per_batch": 2})
    assert main(["data", "check", "--data", str(cfg)]) == 0  # listed and present: found lazily, at load time
    capsys.readouterr()
    assert main(["data", "check", "--data", str(cfg), "--verify"]) == 1
    assert f"cannot read image {bad}" in capsys.readouterr().err


def test_usage(capsys):
    assert main(["data", "--help"]) == 0
    assert "hardneg data check --data" in capsys.readouterr().out
    assert main(["data", "inspect"]) == 2
    assert main(["--help"]) == 0
    assert "data       check a DataModule" in capsys.readouterr().out


def test_rejects_what_fit_rejects_naming_the_dataset_class(tmp_path, capsys, no_training):
    """A class with fewer images than K: data check (even --verify) and fit stop with the same message."""
    args = small_class_cub(tmp_path)
    cfg = fragment(tmp_path, "datamodules.CUB200DataModule", {**args, "classes_per_batch": 2, "samples_per_class": 4})
    assert main(["data", "check", "--data", str(cfg), "--verify"]) == 1
    err = capsys.readouterr().err
    problem = next(line for line in err.splitlines() if "data.init_args.samples_per_class" in line).strip("- ")
    assert "002.Laysan_Albatross (3 images)" in problem and "class 1 " not in problem
    fit = fit_error(tmp_path, "--data=datamodules.CUB200DataModule", *[f"--data.init_args.{k}={v}" for k, v in args.items()],
                    "--data.init_args.classes_per_batch=2", "--data.init_args.samples_per_class=4")
    assert problem in fit


def test_run_config_checks_the_model_against_the_data(tmp_path, capsys):
    """The recipe's ProxyAnchorLoss is built (not its hub encoder) and checked against the folder."""
    args = make_cub(tmp_path / "cub")
    recipe = load_config(ROOT / "experiments/recipes/metrix_proxy_anchor_cub.yaml")  # its parts composed
    recipe["data"]["init_args"].update(args, classes_per_batch=2, samples_per_class=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(recipe))
    assert main(["data", "check", "--data", str(config)]) == 0
    capsys.readouterr()
    recipe["model"]["init_args"]["loss"]["init_args"].update(num_classes=2, embedding_size=128)
    config.write_text(yaml.safe_dump(recipe))
    assert main(["data", "check", "--data", str(config)]) == 1
    err = capsys.readouterr().err
    assert "model.init_args.loss.init_args.num_classes: ProxyAnchorLoss has num_classes=2" in err
    assert "labels 0..3 (4 classes); set num_classes: 4" in err
    assert "model.init_args.loss.init_args.embedding_size: ProxyAnchorLoss has embedding_size=128" in err
    assert "outputs 512-d embeddings" in err


# ------------------------------------------------------------------ every DataModule, not only benchmark folders
def test_digits(tmp_path, capsys):
    cfg = fragment(tmp_path, "datamodules.DigitsDataModule", {"classes_per_batch": 5, "num_workers": 0})
    assert main(["data", "check", "--data", str(cfg)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert "datamodules.digits.DigitsDataModule" in out and table["split"] == ["images", "classes"]
    assert table["train"] == ["901", "5"] and table["test"] == ["896", "5"]
    cfg = fragment(tmp_path, "datamodules.DigitsDataModule", {"train_classes": [0, 11]})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert "digits train split: classes [11] have no samples" in capsys.readouterr().err


def test_fashion_mnist(tmp_path, capsys):
    from tests.datamodules.test_fashion_mnist import make_fashion

    root = make_fashion(tmp_path / "fm")
    cfg = fragment(tmp_path, "datamodules.FashionMNISTDataModule", {"root": str(root), "classes_per_batch": 5, "samples_per_class": 2})
    assert main(["data", "check", "--data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"root={root}" in out
    table = rows(out)
    assert table["train"] == ["30", "5"] and table["test"] == ["20", "5"]
    # the defaults (P=8) ask for more classes than the 5 train classes: what fit would reject
    cfg = fragment(tmp_path, "datamodules.FashionMNISTDataModule", {"root": str(root)})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert "data.init_args.classes_per_batch: a batch draws 8 distinct classes" in capsys.readouterr().err
    cfg = fragment(tmp_path, "datamodules.FashionMNISTDataModule", {"root": str(tmp_path / "none")})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert "Fashion-MNIST root" in capsys.readouterr().err


def test_fashion_mnist_debian_package(tmp_path, capsys):
    from datamodules.fashion_mnist import DEBIAN_ROOT
    from tests.helpers import require_path

    require_path(DEBIAN_ROOT, "Debian package dataset-fashion-mnist")
    cfg = fragment(tmp_path, "datamodules.FashionMNISTDataModule", {"classes_per_batch": 5})
    assert main(["data", "check", "--data", str(cfg)]) == 0
    table = rows(capsys.readouterr().out)
    assert table["train"] == ["30,000", "5"] and table["test"] == ["5,000", "5"]


def test_two_view_wrapper(tmp_path, capsys):
    args = make_cub(tmp_path / "cub")
    inner = {"class_path": "datamodules.CUB200DataModule", "init_args": {**args, "num_workers": 0}}
    cfg = fragment(tmp_path, "datamodules.two_view_datamodule.TwoViewDataModule", {"datamodule": inner, "batch_size": 8})
    assert main(["data", "check", "--data", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "TwoViewDataModule wrapping datamodules.cub200.CUB200DataModule" in out
    table = rows(out)
    assert table["train"] == ["16", "4"] and table["test"] == ["16", "4"]
    inner["init_args"]["root"] = str(tmp_path / "missing")
    cfg = fragment(tmp_path, "datamodules.two_view_datamodule.TwoViewDataModule", {"datamodule": inner})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert f"root {tmp_path / 'missing'} does not exist" in capsys.readouterr().err


def test_text_datamodule_and_injected_sampler(tmp_path, capsys):
    """A text DataModule is checked without its tokenizer (it comes from the encoder); an injected
    non-P x K sampler skips the P x K checks, an injected P x K one is checked under its own option."""
    text = "tests.datamodules.test_text_and_sampler."
    cfg = fragment(tmp_path, text + "TinyTextDataModule",
                   {"batch_sampler": {"class_path": text + "FirstItemsBatchSampler", "init_args": {"batch_size": 4}}})
    assert main(["data", "check", "--data", str(cfg)]) == 0  # default P=8 would need 8 classes: not used
    table = rows(capsys.readouterr().out)
    assert table["split"] == ["items", "classes"] and table["train"] == ["20", "4"] and table["test"] == ["10", "2"]
    pk = {"class_path": "datamodules.ClassBalancedBatchSampler", "init_args": {"classes_per_batch": 5, "samples_per_class": 2}}
    cfg = fragment(tmp_path, text + "TinyTextDataModule", {"batch_sampler": pk})
    assert main(["data", "check", "--data", str(cfg)]) == 1
    assert "data.init_args.batch_sampler.init_args.classes_per_batch: a batch draws 5 distinct classes" in capsys.readouterr().err

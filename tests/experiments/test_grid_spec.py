"""Grid files: expansion (cartesian product, exclude, seeds, labels), errors, and the shipped grids."""

import itertools
from pathlib import Path

import pytest
import yaml

from experiments.cli import main
from experiments.grid_spec import GRID_CALLBACKS, GridSpec

ROOT = Path(__file__).resolve().parents[2]
GRIDS = sorted((ROOT / "experiments" / "grids").glob("*.yaml"))
MINER = "experiments/miner/batch_hard.yaml"
MS_MINER = "experiments/miner/multi_similarity.yaml"
TRIPLET = "experiments/loss/triplet_margin.yaml"
CONTRASTIVE = "experiments/loss/contrastive.yaml"


def write_grid(tmp_path: Path, **content) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def example(tmp_path: Path, **changes) -> GridSpec:
    content = {
        "base": ["tests/configs/digits_tiny.yaml", "trainer.max_epochs=2"],
        "axes": {
            "miner": {"bh": MINER, "ms": MS_MINER},
            "loss": [TRIPLET, [CONTRASTIVE, "model.init_args.loss.init_args.neg_margin=0.5"]],
            "lr": ["model.init_args.optimizer.init_args.lr=0.01", "model.init_args.optimizer.init_args.lr=0.001"],
        },
        "seeds": 2,
        "exclude": [{"miner": "ms", "loss": "triplet_margin"}, {"lr": "0.001", "miner": ["bh"], "loss": "contrastive+0.5"}],
        "overrides": ["trainer.enable_progress_bar=false"],
        **changes,
    }
    return GridSpec.load(write_grid(tmp_path, **content), output=tmp_path / "out")


def test_cartesian_product_minus_exclude(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = example(tmp_path)
    assert list(spec.axes) == ["miner", "loss", "lr"]
    assert list(spec.axes["loss"]) == ["triplet_margin", "contrastive+0.5"]  # automatic labels
    assert list(spec.axes["lr"]) == ["0.01", "0.001"]
    expected = [
        dict(miner=m, loss=l, lr=r)
        for m, l, r in itertools.product(["bh", "ms"], ["triplet_margin", "contrastive+0.5"], ["0.01", "0.001"])
        if not (m == "ms" and l == "triplet_margin") and not (r == "0.001" and m == "bh" and l == "contrastive+0.5")
    ]
    assert spec.combinations() == expected
    cells = spec.cells()
    assert len(cells) == len(expected) * 2
    assert [(c.labels, c.seed) for c in cells] == [(combo, s) for combo in expected for s in (0, 1)]
    assert len({c.folder for c in cells}) == len(cells)
    assert all(c.folder.parent == (tmp_path / "out" / "cells").resolve() for c in cells)
    assert cells[0].id == "miner=bh,loss=triplet_margin,lr=0.01,seed=0"


def test_cell_arguments_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    cell = next(c for c in example(tmp_path).cells() if c.labels == {"miner": "bh", "loss": "contrastive+0.5", "lr": "0.01"} and c.seed == 1)
    expected = [
        "fit",
        "--config", str(ROOT / "tests/configs/digits_tiny.yaml"),
        "--trainer.max_epochs=2",
        "--config", str(ROOT / MINER),
        "--config", str(ROOT / CONTRASTIVE),
        "--model.init_args.loss.init_args.neg_margin=0.5",
        "--model.init_args.optimizer.init_args.lr=0.01",
        "--trainer.enable_progress_bar=false",
        "--seed_everything=1",
        *[f"--trainer.callbacks+={c}" for c in GRID_CALLBACKS],
    ]  # fmt: skip
    assert list(cell.argv) == expected
    assert cell.fit_argv(resume=False)[-1] == f"--trainer.default_root_dir={cell.folder}"
    assert cell.fit_argv(resume=True)[-3:] == [f"--trainer.default_root_dir={cell.folder}", "--ckpt_path", "last"]


def test_seeds_and_seed_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = example(tmp_path, seeds=[3, 7], seed_keys=["seed_everything", "data.init_args.seed"], exclude=[])
    cells = spec.cells()
    assert sorted({c.seed for c in cells}) == [3, 7]
    assert len(cells) == 2 * 2 * 2 * 2
    assert "--seed_everything=7" in cells[1].argv and "--data.init_args.seed=7" in cells[1].argv


def test_fragments_resolve_from_the_project_root_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = example(tmp_path)
    assert spec.resolve(MINER) == ["--config", str(ROOT / MINER)]
    local = tmp_path / "experiments" / "miner" / "batch_hard.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("model: {}\n")
    assert spec.resolve(MINER) == ["--config", str(local)]  # the current folder first


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"axis": {}}, "unknown keys ['axis']"),
        ({"exclude": [{"encoder": "x"}]}, "names axis 'encoder'"),
        ({"exclude": [{"miner": "nope"}]}, "names miner=nope"),
        ({"axes": {"miner": ["experiments/miner/missing.yaml"]}}, "'experiments/miner/missing.yaml' not found"),
        ({"axes": {"miner": ["no_equals_sign"]}}, "neither a .yaml/.yml config fragment nor a key=value"),
        ({"axes": {"miner": [MINER, MINER]}}, "two values labelled 'batch_hard'"),
        ({"axes": {"seed": [MINER]}}, "axis name 'seed'"),
        ({"axes": {"miner": []}}, "axis 'miner' has no values"),
        ({"axes": {"miner": {"bad label": MINER}}}, "label 'bad label'"),
        ({"seeds": [0, 0]}, "repeat a seed"),
        ({"seeds": 0}, "positive count"),
        ({"axes": {"miner": [MINER]}, "exclude": [{"miner": "batch_hard"}]}, "remove every combination"),
    ],
)
def test_errors_name_the_problem(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(ROOT)
    if "axes" in changes:
        changes = {"exclude": [], **changes}
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        example(tmp_path, **changes)
    assert message in str(info.value)


def test_dry_run_prints_every_cell_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    path = write_grid(tmp_path, base=["tests/configs/digits_tiny.yaml"], axes={"miner": [MINER, MS_MINER]}, seeds=[0, 1])
    assert main(["grid", str(path), "--output", str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 cells = (2 miner) x 2 seeds" in out
    for cell_id in ("miner=batch_hard,seed=0", "miner=batch_hard,seed=1", "miner=multi_similarity,seed=0", "miner=multi_similarity,seed=1"):
        assert f"new        {cell_id}" in out
    assert out.count("hardneg fit --config") == 4
    assert not (tmp_path / "out").exists()


def test_bad_grid_file_exits_with_a_message(tmp_path, capsys):
    assert main(["grid", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_shipped_grids_exist():
    assert any(p.stem == "quickstart" for p in GRIDS)


def test_quickstart_grid_shape(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = GridSpec.load(ROOT / "experiments" / "grids" / "quickstart.yaml")
    assert len(spec.combinations()) >= 4 and len(spec.seeds) >= 3
    assert {"miner", "loss"} <= set(spec.axes)
    assert spec.base[0] == "experiments/quickstart/fashion_mnist.yaml"


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grid_cells_are_valid_fit_configs(path, monkeypatch, capsys):
    """Every combination's arguments parse as a ``hardneg fit`` config (``--print_config``: no run)."""
    from experiments.lightning_cli import run_lightning_cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    spec = GridSpec.load(path, output="/tmp/unused")
    seen = set()
    for cell in spec.cells():
        if tuple(cell.labels.items()) in seen:
            continue
        seen.add(tuple(cell.labels.items()))
        with pytest.raises(SystemExit) as exit_info:
            run_lightning_cli([*cell.fit_argv(resume=False), "--print_config"])
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["seed_everything"] == cell.seed
        assert config["trainer"]["default_root_dir"] == str(cell.folder)
        callbacks = [c["class_path"] for c in config["trainer"]["callbacks"]]
        assert all(c in callbacks for c in GRID_CALLBACKS)

"""Grid files: expansion (cartesian product, exclude, seeds, labels), errors, and the shipped grids."""

import itertools
from pathlib import Path

import pytest
import yaml

from experiments.cli import main
from experiments.grid.cell import Cell
from experiments.grid.spec import BASELINE_CALLBACKS, GRID_CALLBACKS, GridSpec

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
        ({"baseline": ["encoder"]}, "baseline: 'encoder' is not an axis"),
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
    assert "+ 2 untrained-baseline evaluations (one per seed)" in out
    assert "new        baseline,seed=0" in out and out.count("hardneg test --config") == 2
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


def test_baseline_jobs_one_per_seed_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = example(tmp_path)
    cells, jobs = spec.cells(), spec.baseline_cells()
    assert [(j.id, j.seed, j.labels) for j in jobs] == [("baseline,seed=0", 0, {}), ("baseline,seed=1", 1, {})]
    for job in jobs:
        first = next(c for c in cells if c.seed == job.seed)  # the untrained model of the first cell of its seed
        assert job.is_baseline and job.entries == first.entries
        assert job.argv == ("test", *first.argv[1 : -len(GRID_CALLBACKS)], *(f"--trainer.callbacks+={c}" for c in BASELINE_CALLBACKS))
        assert job.folder == (tmp_path / "out" / "baseline" / f"seed-{job.seed}").resolve()
        assert not job.can_resume() and job.fit_argv(resume=True)[-1] == f"--trainer.default_root_dir={job.folder}"
        assert Cell.from_record(job.record()) == job
    assert spec.jobs() == [*jobs, *cells]
    record = spec.record()
    assert record["baseline_axes"] == [] and [r["id"] for r in record["baseline"]] == ["baseline,seed=0", "baseline,seed=1"]
    assert all(not c.is_baseline and Cell.from_record(c.record()) == c for c in cells)


def test_baseline_per_axis_or_none(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = example(tmp_path, baseline=["loss"])
    ids = [j.id for j in spec.baseline_cells()]
    assert ids == [f"baseline,loss={loss},seed={s}" for loss in ("triplet_margin", "contrastive+0.5") for s in (0, 1)]
    assert spec.baseline_cells()[0].folder.name == "loss-triplet_margin__seed-0"
    assert all("--config" in j.argv and j.labels == {"loss": j.id.split(",")[1].split("=")[1]} for j in spec.baseline_cells())
    none = example(tmp_path, baseline=False)
    assert none.baseline_cells() == [] and none.record()["baseline_axes"] is None and none.jobs() == none.cells()


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.name)
def test_grid_baselines_are_valid_test_configs(path, monkeypatch, capsys):
    """Every baseline job's arguments parse as a ``hardneg test`` config (``--print_config``: no run)."""
    from experiments.lightning_cli import run_lightning_cli

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr("sys.argv", ["hardneg"])
    spec = GridSpec.load(path, output="/tmp/unused")
    for job in spec.baseline_cells()[:1]:
        with pytest.raises(SystemExit) as exit_info:
            run_lightning_cli([*job.fit_argv(resume=False), "--print_config"])
        assert exit_info.value.code in (0, None)
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["seed_everything"] == job.seed and config.get("ckpt_path") is None
        assert BASELINE_CALLBACKS[0] in [c["class_path"] for c in config["trainer"]["callbacks"]]


def test_baseline_seeds_limit_the_baseline_jobs(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nbase: [trainer.max_epochs=1]\naxes:\n  lr: {a: [model.init_args.optimizer.init_args.lr=0.1], b: [model.init_args.optimizer.init_args.lr=0.2]}\n"
                    "seeds: [0, 1, 2]\nbaseline_seeds: [0]\n")
    spec = GridSpec.load(path)
    assert [job.seed for job in spec.baseline_cells()] == [0] and len(spec.cells()) == 6
    path.write_text(path.read_text().replace("baseline_seeds: [0]", "baseline_seeds: [5]"))
    with pytest.raises(ValueError, match="baseline_seeds"):
        GridSpec.load(path)

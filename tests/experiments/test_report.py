"""``hardneg report``: mean +/- std over seeds against hand-computed values, tables and plots."""

import csv
import math
from pathlib import Path

import pytest

from experiments.atomic import atomic_write_json
from experiments.cli import main
from experiments.report import layout, write_report
from experiments.run_folder import read_metrics_csv

# recall@1 per (miner, loss) and seed; None: the cell did not finish. (miner=ms, loss=x) is excluded.
VALUES = {
    ("bh", "x"): [0.50, 0.60, 0.70],
    ("bh", "y"): [0.80, 0.84, None],
    ("ms", "y"): [0.90, 0.90, 0.93],
}
# By hand: mean and sample standard deviation (divide by n - 1).
EXPECTED = {
    ("bh", "x"): (0.6, 0.1),  # deviations -.1, 0, .1 -> sqrt(.02 / 2)
    ("bh", "y"): (0.82, math.sqrt(2 * 0.02**2 / 1)),  # two seeds: deviations +-.02
    ("ms", "y"): (0.91, math.sqrt((0.01**2 * 2 + 0.02**2) / 2)),
}


def make_grid(root: Path) -> Path:
    cells = []
    for (miner, loss), values in VALUES.items():
        for seed, value in enumerate(values):
            folder = root / "cells" / f"miner-{miner}__loss-{loss}__seed-{seed}"
            folder.mkdir(parents=True)
            cells.append({"id": f"miner={miner},loss={loss},seed={seed}", "name": folder.name, "labels": [["miner", miner], ["loss", loss]],
                          "seed": seed, "entries": [], "argv": [], "folder": f"/moved/away/{folder.name}"})  # fmt: skip
            if value is None:
                continue
            atomic_write_json(folder / "done.json", {"metrics": {"recall@1": value, "map@r": value / 2}, "metrics_before": {"recall@1": 0.3},
                                                     "source": "results.json (test, after training)", "seconds": 60.0})  # fmt: skip
            (folder / "metrics.csv").write_text(
                "epoch,step,train/loss,val/recall@1\n0,0,1.0,\n0,1,0.8,\n0,1,,0.5\n1,3,0.6,\n1,3,,0.6\n"
                "1,3,0.55,\n"  # a resumed run logs step 3 again: the later value wins
            )
            steps = [{"step": s, "epoch": 0, "ap": {"n": 4, "mean": 0.5, "q05": 0.1, "q25": 0.3, "q50": 0.5, "q75": 0.7, "q95": 0.9},
                      "an": {"n": 4, "mean": 0.2, "q05": -0.2, "q25": 0.0, "q50": 0.2, "q75": 0.4, "q95": 0.6}} for s in (1, 2, 3)]  # fmt: skip
            hardness = {"bin_edges": [-1.0, 0.0, 1.0], "steps": steps, "epochs": [{"epoch": 0, "ap": [1, 3], "an": [2, 2]}]}
            atomic_write_json(folder / "hardness.json", hardness)
    grid = {"name": "toy", "axes": [{"name": "miner", "labels": ["bh", "ms"]}, {"name": "loss", "labels": ["x", "y"]}], "seeds": [0, 1, 2], "cells": cells}
    atomic_write_json(root / "grid.json", grid)
    return root


def test_mean_and_std_over_seeds(tmp_path):
    out = write_report(make_grid(tmp_path), plots=False)
    with open(out / "report.csv") as f:
        rows = {(r["miner"], r["loss"]): r for r in csv.DictReader(f)}
    assert set(rows) == set(EXPECTED)
    for key, (mean, std) in EXPECTED.items():
        assert float(rows[key]["recall@1_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(rows[key]["recall@1_std"]) == pytest.approx(std, abs=1e-12)
        assert float(rows[key]["map@r_mean"]) == pytest.approx(mean / 2, abs=1e-12)
    assert [rows[k]["n"] for k in EXPECTED] == ["3", "2", "3"]
    with open(out / "cells.csv") as f:
        assert len(list(csv.DictReader(f))) == 8


def test_markdown_table_has_the_axes_as_rows_and_columns(tmp_path):
    out = write_report(make_grid(tmp_path), plots=False)
    text = (out / "report.md").read_text()
    assert "| miner \\ loss | x | y |" in text
    assert "| bh | 0.6000 ± 0.1000 | 0.8200 ± 0.0283 (n=2) |" in text
    assert "| ms | – | 0.9100 ± 0.0173 |" in text
    assert "- miner=bh,loss=y,seed=2" in text  # listed as not finished
    # Rows and columns swapped on request.
    out = write_report(tmp_path, rows=["loss"], cols="miner", plots=False)
    assert "| loss \\ miner | bh | ms |" in (out / "report.md").read_text()


def test_plots_and_cli(tmp_path, capsys):
    grid = make_grid(tmp_path)
    assert main(["report", str(grid), "--metric", "map@r"]) == 0
    assert "0.3000 ± 0.0500" in capsys.readouterr().out
    report = grid / "report"
    pngs = ["map_at_r.png", "curves.png", "hardness.png"] + [f"hardness/miner-bh__loss-x__seed-{s}.png" for s in range(3)]
    for name in pngs:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert not (report / "hardness" / "miner-bh__loss-y__seed-2.png").exists()  # not finished


def test_errors(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no grid.json" in capsys.readouterr().err
    make_grid(tmp_path)
    assert main(["report", str(tmp_path), "--metric", "recall@99", "--no-plots"]) == 2
    assert "'recall@99' is not among the final metrics" in capsys.readouterr().err
    with pytest.raises(ValueError, match="neither --rows nor --cols"):
        layout({"a": ["1", "2"], "b": ["1", "2"], "c": ["1", "2"]}, rows=["a"], cols="b")
    assert layout({"a": ["1", "2"], "b": ["1"], "c": ["1", "2"]}) == (["a"], "c")


def test_metrics_csv_of_a_resumed_run_keeps_the_later_value(tmp_path):
    make_grid(tmp_path)
    rows = read_metrics_csv(tmp_path / "cells" / "miner-bh__loss-x__seed-0" / "metrics.csv")
    assert [(r["step"], r.get("train/loss"), r.get("val/recall@1")) for r in rows] == [
        (0, 1.0, None), (1, 0.8, None), (1, None, 0.5), (3, 0.55, None), (3, None, 0.6)
    ]

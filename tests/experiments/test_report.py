"""``hardneg report``: mean +/- std over seeds against hand-computed values, tables and plots."""

import csv
import math
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import yaml

from experiments.atomic import atomic_write_json
from experiments.cli import main
from experiments.grid import report_plots
from experiments.grid.report import aggregate, baseline_table, curve_problems, layout, load_baseline, load_grid, paired_differences, write_report
from experiments.grid.run_folder import read_metrics_csv

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


# The untrained encoder per seed (test recall@1, validation recall@1): mean 0.41 +/- 0.01, 0.46 +/- 0.02.
BASELINE = {0: (0.40, 0.44), 1: (0.41, 0.46), 2: (0.42, 0.48)}


def make_grid(root: Path, baseline: bool = False) -> Path:
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
    if baseline:
        grid["baseline_axes"], grid["baseline"] = [], []
        for seed, (test, val) in BASELINE.items():
            folder = root / "baseline" / f"seed-{seed}"
            grid["baseline"].append({"id": f"baseline,seed={seed}", "kind": "baseline", "name": folder.name, "labels": [], "seed": seed,
                                     "entries": [], "argv": ["test"], "folder": f"/moved/away/{folder.name}"})  # fmt: skip
            atomic_write_json(folder / "done.json", {"kind": "baseline", "metrics": {"recall@1": test, "map@r": test / 2},
                                                     "metrics_val": {"recall@1": val}, "source": "results.json (test, untrained)"})  # fmt: skip
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


def test_untrained_baseline_is_a_row_of_the_tables(tmp_path):
    out = write_report(make_grid(tmp_path, baseline=True), plots=False)
    text = (out / "report.md").read_text()
    table = text.split("| miner \\ loss | x | y |\n|---|---|---|\n", 1)[1].splitlines()
    assert table[0] == "| untrained | 0.4100 ± 0.0100 | 0.4100 ± 0.0100 |"  # the first row; no loss axis: the same in each column
    assert table[1] == "| bh | 0.6000 ± 0.1000 | 0.8200 ± 0.0283 (n=2) |"
    assert "| untrained | untrained | 3 | 0.2050 ± 0.0050 | 0.4100 ± 0.0100 |" in text  # all final metrics: map@r, recall@1
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[0] == "run"
    untrained = [r for r in rows if r["run"] == "untrained"]
    assert len(untrained) == 1 and untrained[0]["miner"] == "" and untrained[0]["n"] == "3"
    assert float(untrained[0]["recall@1_mean"]) == pytest.approx(0.41) and float(untrained[0]["recall@1_std"]) == pytest.approx(0.01)
    assert float(untrained[0]["val/recall@1_mean"]) == pytest.approx(0.46)
    assert {(r["miner"], r["loss"]) for r in rows if r["run"] == "trained"} == set(EXPECTED)
    with open(out / "cells.csv") as f:
        assert [r["cell"] for r in csv.DictReader(f) if r["run"] == "untrained"] == ["seed-0", "seed-1", "seed-2"]
    # Without baseline jobs the report says why the row is missing.
    assert "No `untrained` row" in (write_report(make_grid(tmp_path / "old"), plots=False) / "report.md").read_text()


def baseline_lines(ax: plt.Axes) -> list:
    return [line for line in ax.get_lines() if line.get_label().startswith("untrained")]


def test_untrained_baseline_is_a_line_on_the_plots(tmp_path):
    grid_dir = make_grid(tmp_path, baseline=True)
    grid, cells = load_grid(grid_dir)
    frame = baseline_table(load_baseline(grid_dir, grid))
    baseline = report_plots.Baseline(aggregate(frame, []), [])
    out = write_report(grid_dir, plots=False)
    import pandas as pd

    agg = pd.read_csv(out / "report.csv").query("run == 'trained'")
    cell_frame = pd.read_csv(out / "cells.csv").query("run == 'trained'")
    fig = report_plots.plot_metric(agg, cell_frame, "recall@1", ["miner"], "loss", grid, baseline)
    (line,) = baseline_lines(fig.axes[0])
    assert list(line.get_ydata()) == pytest.approx([0.41, 0.41]) and line.get_linestyle() == "--"
    plt.close(fig)
    groups = report_plots.combinations(cells, ["miner", "loss"])
    fig = report_plots.plot_curves(groups, "recall@1", baseline)
    loss_panel, val_panel = fig.axes
    assert not baseline_lines(loss_panel)  # the loss has no untrained value
    (line,) = baseline_lines(val_panel)
    assert list(line.get_ydata()) == pytest.approx([0.46, 0.46])  # the validation score, as the curves
    plt.close(fig)
    # Baseline per label of a row axis: a line over that label's points only.
    per_miner = pd.DataFrame([{"miner": "bh", "n": 1, "recall@1_mean": 0.3, "recall@1_std": math.nan},
                              {"miner": "ms", "n": 1, "recall@1_mean": 0.5, "recall@1_std": math.nan}])  # fmt: skip
    fig = report_plots.plot_metric(agg, cell_frame, "recall@1", ["miner"], "loss", grid, report_plots.Baseline(per_miner, ["miner"]))
    lines = {line.get_label(): line for line in baseline_lines(fig.axes[0])}
    assert set(lines) == {"untrained, miner=bh", "untrained, miner=ms"}
    assert max(lines["untrained, miner=bh"].get_xdata()) < 0.5 < min(lines["untrained, miner=ms"].get_xdata())
    assert list(lines["untrained, miner=ms"].get_ydata()) == [0.5, 0.5]
    plt.close(fig)
    # And the report writes the plots with it.
    write_report(grid_dir)
    assert (grid_dir / "report" / "curves.png").is_file() and (grid_dir / "report" / "recall_at_1.png").is_file()


def plan(folder: Path, every: int, epochs: int, total_steps: int) -> None:
    (folder / "config.yaml").write_text(yaml.safe_dump({"trainer": {"log_every_n_steps": every, "max_epochs": epochs, "max_steps": -1}}))
    atomic_write_json(folder / "progress.json", {"step": total_steps, "total_steps": total_steps, "epoch": epochs, "max_epochs": epochs, "stage": "final evaluation"})


def test_report_warns_about_incomplete_curves(tmp_path, capsys):
    grid = make_grid(tmp_path)
    cells = grid / "cells"
    header = "epoch,step,train/loss,val/recall@1\n"
    # Complete: 2 epochs of 4 steps logged every 2 steps (steps 1, 3, 5, 7), validation after each epoch.
    complete = header + "0,1,0.9,\n0,3,0.8,\n0,3,,0.5\n1,5,0.7,\n1,7,0.6,\n1,7,,0.6\n"
    for seed in range(3):
        (cells / f"miner-bh__loss-x__seed-{seed}" / "metrics.csv").write_text(complete)
        plan(cells / f"miner-bh__loss-x__seed-{seed}", every=2, epochs=2, total_steps=8)
    assert curve_problems(cells / "miner-bh__loss-x__seed-0") == []
    # A resume that lost steps 3-5 (and so the first validation), and a run whose log stops early.
    (cells / "miner-bh__loss-x__seed-1" / "metrics.csv").write_text(header + "0,1,0.9,\n1,7,0.6,\n1,7,,0.6\n")
    (cells / "miner-bh__loss-x__seed-2" / "metrics.csv").write_text(header + "0,1,0.9,\n0,3,0.8,\n0,3,,0.5\n")
    (cells / "miner-ms__loss-y__seed-0" / "metrics.csv").unlink()
    out = write_report(grid, plots=False)
    text = (out / "report.md").read_text()
    expected = [
        "miner=bh,loss=x,seed=1: training loss has gaps between steps 1-7 (logged every 2 steps)",
        "miner=bh,loss=x,seed=1: validation is missing for epoch(s) 0 of 0-1",
        "miner=bh,loss=x,seed=2: training loss ends at step 3 of 8",
        "miner=bh,loss=x,seed=2: validation ends at epoch 0, the run trained 2 epochs (0-1)",
        "miner=ms,loss=y,seed=0: no metrics: metrics.csv is missing or empty, so it has no training curve",
    ]
    warned = capsys.readouterr().err
    assert "## Warnings: incomplete training curves" in text
    for line in expected:
        assert f"- {line}" in text
        assert f"warning: incomplete training curve of {line}" in warned
    assert "seed=0: training" not in text and "bh,loss=x,seed=0" not in warned


def test_untrained_row_on_the_split_of_the_final_metrics(tmp_path):
    """Cells without RetrievalReport end with their last validation: the baseline shows its validation score."""
    grid = make_grid(tmp_path, baseline=True)
    for done in (grid / "cells").glob("*/done.json"):
        atomic_write_json(done, {**yaml.safe_load(done.read_text()), "source": "metrics.csv (last validation)"})
    text = (write_report(grid, plots=False) / "report.md").read_text()
    assert "| untrained | 0.4600 ± 0.0200 | 0.4600 ± 0.0200 |" in text and "on the validation split like the cells" in text


def test_paired_differences_by_seed_against_one_arm(tmp_path):
    grid = make_grid(tmp_path)
    out = write_report(grid, plots=False, paired="miner=bh")
    # by hand: (ms, y) - (bh, y) on the seeds both finished (0, 1): 0.90 - 0.80, 0.90 - 0.84
    table = {(r["loss"], r["miner"]): r for r in csv.DictReader(open(out / "paired.csv"))}
    assert set(table) == {("y", "ms")}  # (ms, x) never ran: no pair; bh is the reference
    row = table[("y", "ms")]
    assert int(row["n"]) == 2 and int(row["recall@1_wins"]) == 2
    assert float(row["recall@1_mean"]) == pytest.approx(0.08)
    assert float(row["recall@1_std"]) == pytest.approx(math.sqrt(2 * 0.02**2))
    text = (out / "report.md").read_text()
    assert "## Paired differences against miner = bh" in text and "+0.0800 ± 0.0283 (2/2 > 0)" in text
    _, cells = load_grid(grid)
    from experiments.grid.report import cell_table
    frame = cell_table(load_grid(grid)[0], cells)
    with pytest.raises(ValueError, match="not an axis"):
        paired_differences(frame, ["miner", "loss"], "sampler", "bh", ["recall@1"])
    with pytest.raises(ValueError, match="no finished cell has miner = 'nope'"):
        paired_differences(frame, ["miner", "loss"], "miner", "nope", ["recall@1"])
    with pytest.raises(ValueError, match="AXIS=LABEL|<axis>=<label>"):
        write_report(grid, plots=False, paired="miner")

"""``hardneg report GRID_DIR``: one table of a grid's final metrics (mean +/- std over seeds) and plots.

Writes into ``GRID_DIR/report/``:

- ``report.md``: the chosen metric with the grid's axes as rows and columns (the last axis that
  varies is the columns) and the untrained encoder (the grid's baseline jobs) as the first row
  ``untrained``, then every final metric per combination, the cells that did not finish, and
  warnings about incomplete training curves;
- ``report.csv``: one row per combination: ``run`` (``trained``, or ``untrained`` for the
  baseline), the axes, ``n`` (seeds finished), ``<metric>_mean`` and ``<metric>_std`` for every
  metric; ``cells.csv``: one row per finished cell and baseline job;
- PNGs (``experiments.grid.report_plots``): the metric per combination with error bars, training curves
  (loss and validation metric), and the hardness of the mined pairs over training per run; the
  untrained baseline is a dashed horizontal line on the metric plot and the validation curves.

A training curve is checked against the run's plan (``progress.json``, ``config.yaml``): a cell
whose ``metrics.csv`` has no rows, misses logged steps or validation epochs, or ends before its last
step is named in a warning, printed and written into ``report.md``.

Mean and standard deviation are over the finished seeds of a combination; the standard deviation
is the sample one (``ddof=1``), left empty for a single seed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from experiments.atomic import atomic_write_text
from experiments.grid.cell import Cell
from experiments.grid.run_folder import read_metrics_csv

PLUS_MINUS = "±"
TIMES = ("seconds", "cpu_seconds")  # wall and CPU seconds of a cell's last attempt


def load_grid(grid_dir: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """``grid.json`` of a grid folder (written by ``hardneg grid``) and its cells."""
    grid_dir = Path(grid_dir)
    path = grid_dir / "grid.json"
    if not path.is_file():
        raise FileNotFoundError(f"{grid_dir} has no grid.json; expected the output folder of `hardneg grid FILE` (e.g. runs/grids/quickstart)")
    grid = json.loads(path.read_text())
    grid["axes"] = {axis["name"]: axis["labels"] for axis in grid["axes"]}
    cells = []
    for record in grid["cells"]:
        cell = Cell.from_record(record)
        # The folder may have moved since the grid ran: cells are found relative to grid.json.
        cells.append(Cell.from_record({**record, "folder": str(grid_dir / "cells" / cell.folder.name)}))
    return grid, cells


def load_baseline(grid_dir: str | Path, grid: dict[str, Any]) -> list[Cell]:
    """The grid's baseline jobs (``grid.json`` ``baseline``; none for a grid run without them)."""
    return [Cell.from_record({**r, "folder": str(Path(grid_dir) / "baseline" / Path(r["folder"]).name)}) for r in grid.get("baseline") or []]


def baseline_table(jobs: list[Cell], validation: bool = False) -> pd.DataFrame:
    """One row per finished baseline job: its axes, ``seed``, ``cell`` (folder name), its test
    metrics (its validation metrics with ``validation``: for cells whose final metrics are their last
    validation) and ``val/<metric>`` for the validation metrics."""
    rows = []
    for job in jobs:
        if not job.is_finished():
            continue
        done = job.done()
        row: dict[str, Any] = {**job.labels, "seed": job.seed, "cell": job.folder.name}
        main = (done.get("metrics_val") if validation else None) or done["metrics"]
        row.update({k: v for k, v in main.items() if isinstance(v, (int, float))})
        row.update({f"val/{k}": v for k, v in (done.get("metrics_val") or {}).items() if isinstance(v, (int, float))})
        rows.append(row)
    return pd.DataFrame(rows)


def cell_table(grid: dict[str, Any], cells: list[Cell]) -> pd.DataFrame:
    """One row per finished cell: the axes, ``seed``, ``cell`` (folder name), ``seconds`` and its
    final metrics; ``untrained/<metric>`` for the metrics measured before training."""
    rows = []
    for cell in cells:
        if not cell.is_finished():
            continue
        done = cell.done()
        row: dict[str, Any] = {**cell.labels, "seed": cell.seed, "cell": cell.folder.name}
        row.update({key: done.get(key) for key in TIMES})
        row.update({k: v for k, v in done["metrics"].items() if isinstance(v, (int, float))})
        row.update({f"untrained/{k}": v for k, v in (done.get("metrics_before") or {}).items() if isinstance(v, (int, float))})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for axis, labels in grid["axes"].items():
        if axis in frame:
            frame[axis] = pd.Categorical(frame[axis], categories=labels, ordered=True)
    return frame


def metric_columns(frame: pd.DataFrame, axes: list[str]) -> list[str]:
    skip = {*axes, "seed", "cell"}
    return [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]


def aggregate(frame: pd.DataFrame, axes: list[str]) -> pd.DataFrame:
    """Per combination of ``axes``: ``n`` and ``<metric>_mean``, ``<metric>_std`` (sample std, ddof=1).

    Rows follow the axes' label order; combinations without a finished cell are left out.
    """
    metrics = metric_columns(frame, axes)
    if not axes:
        grouped = [((), frame)]
    else:
        grouped = frame.groupby(axes, observed=True, sort=True)
    rows = []
    for key, group in grouped:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(axes, key))
        row["n"] = len(group)
        for m in metrics:
            values = group[m].dropna().astype(float)
            row[f"{m}_mean"] = values.mean() if len(values) else math.nan
            row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(frame: pd.DataFrame, axes: list[str], axis: str, reference: str, metrics: list[str]) -> pd.DataFrame:
    """Per label of ``axis`` other than ``reference`` (and per combination of the other axes): the differences
    ``metric(cell) - metric(reference cell of the same seed and other labels)``, as ``n`` pairs,
    ``<metric>_mean``, ``<metric>_std`` (sample std of the differences) and ``<metric>_wins`` (pairs > 0).

    Pairing by seed removes what the seeds share (the same batches, the same initial projections), so a
    difference smaller than either arm's spread can still be consistent; the wins say on how many seeds.
    Cells without a partner are left out.
    """
    if axis not in axes:
        raise ValueError(f"paired: {axis!r} is not an axis of this grid (axes: {axes})")
    if reference not in set(frame[axis].astype(str)):
        raise ValueError(f"paired: no finished cell has {axis} = {reference!r} (labels: {sorted(set(frame[axis].astype(str)))})")
    others = [a for a in axes if a != axis]
    key = [*others, "seed"]
    ref = frame[frame[axis].astype(str) == reference].set_index(key)[metrics]
    rows = []
    labels = [lab for lab in frame[axis].cat.categories if lab != reference] if isinstance(frame[axis].dtype, pd.CategoricalDtype) else \
        sorted({str(v) for v in frame[axis]} - {reference})
    for label in labels:
        arm = frame[frame[axis].astype(str) == str(label)].set_index(key)[metrics]
        both = arm.index.intersection(ref.index)
        if not len(both):
            continue
        diff = (arm.loc[both] - ref.loc[both]).reset_index()
        grouped = [((), diff)] if not others else diff.groupby(others, observed=True, sort=True)
        for group_key, group in grouped:
            group_key = group_key if isinstance(group_key, tuple) else (group_key,)
            row: dict[str, Any] = {**dict(zip(others, group_key)), axis: str(label), "n": len(group)}
            for m in metrics:
                values = group[m].dropna().astype(float)
                row[f"{m}_mean"] = values.mean() if len(values) else math.nan
                row[f"{m}_std"] = values.std(ddof=1) if len(values) > 1 else math.nan
                row[f"{m}_wins"] = int((values > 0).sum())
            rows.append(row)
    return pd.DataFrame(rows)


def paired_markdown(paired: pd.DataFrame, axes: list[str], axis: str, reference: str, metrics: list[str]) -> list[str]:
    others = [a for a in axes if a != axis]
    header = [*others, axis, "n", *[f"Δ {m}" for m in metrics]]
    rows = []
    for _, r in paired.iterrows():
        texts = [str(r[a]) for a in others] + [str(r[axis]), str(int(r["n"]))]
        for m in metrics:
            mean, std = r[f"{m}_mean"], r[f"{m}_std"]
            spread = 0.0 if math.isnan(std) else std
            texts.append("–" if math.isnan(mean) else f"{mean:+.4f} {PLUS_MINUS} {spread:.4f} ({int(r[f'{m}_wins'])}/{int(r['n'])} > 0)")
        rows.append(texts)
    return [f"## Paired differences against {axis} = {reference}", "",
            f"Per seed, a cell minus the {axis} = {reference} cell of the same seed{' and other labels' if others else ''}; mean {PLUS_MINUS} "
            f"sample std of the differences, and on how many seeds the difference is positive.", "", markdown_table(header, rows), ""]


def format_mean_std(mean: float, std: float, n: int | None = None, n_expected: int | None = None, digits: int = 4) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}" if (std is None or math.isnan(std)) else f"{mean:.{digits}f} {PLUS_MINUS} {std:.{digits}f}"
    if n is not None and n_expected is not None and n < n_expected:
        text += f" (n={n})"
    return text


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def layout(axes: dict[str, list[str]], rows: list[str] | None = None, cols: str | None = None) -> tuple[list[str], str | None]:
    """Row axes and column axis of the main table: by default the axes with more than one label,
    the last of them as columns (with a single varying axis: rows only)."""
    varying = [a for a, labels in axes.items() if len(labels) > 1]
    for name in [*(rows or []), *([cols] if cols else [])]:
        if name not in axes:
            raise ValueError(f"axis {name!r} is not an axis of this grid; its axes are {list(axes)}")
    if cols is None and rows is None:
        cols = varying[-1] if len(varying) > 1 else None
    if rows is None:
        rows = [a for a in varying if a != cols]
    left = [a for a in varying if a not in rows and a != cols]
    if left:
        raise ValueError(f"axes {left} vary in this grid but are neither --rows nor --cols; put every varying axis {varying} in one of them")
    return list(rows), cols


def select(agg: pd.DataFrame, values: dict[str, str]) -> pd.DataFrame:
    """The rows of ``agg`` with these labels (axes that ``agg`` lacks are ignored)."""
    mask = pd.Series(True, index=agg.index)
    for axis, label in values.items():
        if axis in agg:
            mask &= agg[axis].astype(str) == label
    return agg[mask]


def untrained_rows(baseline_agg: pd.DataFrame | None, baseline_axes: list[str], metric: str, axes: dict[str, list[str]], rows: list[str],
                   cols: str | None, n_seeds: int) -> list[list[str]]:  # fmt: skip
    """The ``untrained`` row(s) of the main table: one, or one per label of the row axes the baseline
    depends on; a column the baseline does not depend on repeats its value."""
    if baseline_agg is None or baseline_agg.empty or f"{metric}_mean" not in baseline_agg:
        return []
    by = [a for a in rows if a in baseline_axes]
    out = []
    for key in itertools.product(*(axes[a] for a in by)):
        values = dict(zip(by, key))
        texts = []
        for c in axes[cols] if cols else [None]:
            match = select(baseline_agg, {**values, **({cols: c} if cols else {})})
            r = match.iloc[0] if len(match) == 1 else None
            texts.append("–" if r is None else format_mean_std(r[f"{metric}_mean"], r[f"{metric}_std"], int(r["n"]), n_seeds))
        if any(t != "–" for t in texts):
            out.append([" / ".join(["untrained", *key]), *texts])
    return out


def pivot_markdown(agg: pd.DataFrame, metric: str, axes: dict[str, list[str]], rows: list[str], cols: str | None, n_seeds: int,
                   baseline_agg: pd.DataFrame | None = None, baseline_axes: list[str] | None = None) -> str:  # fmt: skip
    """The main table; ``baseline_agg`` (aggregated over seeds by ``baseline_axes``) adds the
    ``untrained`` row(s) first."""

    def cell_text(match: pd.DataFrame) -> str:
        if match.empty:
            return "–"
        r = match.iloc[0]
        return format_mean_std(r[f"{metric}_mean"], r[f"{metric}_std"], int(r["n"]), n_seeds)

    row_keys = list(itertools.product(*(axes[a] for a in rows))) if rows else [()]
    col_keys = axes[cols] if cols else [metric]
    corner = " \\ ".join(filter(None, [" / ".join(rows), cols])) or "grid"
    table_rows = untrained_rows(baseline_agg, baseline_axes or [], metric, axes, rows, cols, n_seeds)
    for key in row_keys:
        values = dict(zip(rows, key))
        texts = [cell_text(select(agg, {**values, cols: c})) if cols else cell_text(select(agg, values)) for c in col_keys]
        if all(t == "–" for t in texts):
            continue  # an excluded combination
        table_rows.append([" / ".join(key) or "all", *texts])
    return markdown_table([corner, *col_keys], table_rows)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _trainer_config(folder: Path) -> dict[str, Any]:
    """The ``trainer`` section of the run's resolved ``config.yaml`` (``{}`` if unreadable)."""
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    trainer = config.get("trainer") if isinstance(config, dict) else None
    return trainer if isinstance(trainer, dict) else {}


def _spans(pairs: list[tuple[int, int]], limit: int = 4) -> str:
    text = ", ".join(f"{a}-{b}" for a, b in pairs[:limit])
    return text + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def curve_problems(folder: str | Path) -> list[str]:
    """What is missing from the training curves of the run in ``folder``, as short sentences.

    Compares ``metrics.csv`` (read whole; a step logged twice by a resumed run counts once) with the
    run's plan: ``train/loss`` is logged every ``trainer.log_every_n_steps`` steps, at steps
    ``s`` with ``(s + 1) % every == 0``, up to the last of the ``total_steps`` that ``progress.json``
    records; validation runs every ``check_val_every_n_epoch`` epochs of the epochs trained.
    """
    folder = Path(folder)
    rows = read_metrics_csv(folder / "metrics.csv")
    if not rows:
        return ["no metrics: metrics.csv is missing or empty, so it has no training curve"]
    trainer = _trainer_config(folder)
    progress = _read_json(folder / "progress.json")
    problems = []
    every = int(trainer.get("log_every_n_steps") or 50)
    total = progress.get("total_steps") or (trainer.get("max_steps") if (trainer.get("max_steps") or -1) > 0 else None)
    steps = sorted({int(r["step"]) for r in rows if "train/loss" in r})
    if not steps:
        problems.append("no training loss logged")
    else:
        gaps = [(a, b) for a, b in zip(steps, steps[1:]) if b - a > every]
        if gaps:
            problems.append(f"training loss has gaps between steps {_spans(gaps)} (logged every {every} steps)")
        last_expected = (int(total) // every) * every - 1 if total else None
        if last_expected is not None and steps[-1] < last_expected:
            problems.append(f"training loss ends at step {steps[-1]} of {int(total)}")
    max_epochs = progress.get("max_epochs", trainer.get("max_epochs"))
    val_every = trainer.get("check_val_every_n_epoch", 1)
    if max_epochs and max_epochs > 0 and val_every and trainer.get("limit_val_batches", 1) not in (0, 0.0):
        trained = min(int(max_epochs), int(progress["epoch"])) if progress.get("stage") == "final evaluation" else int(max_epochs)
        expected = {e for e in range(trained) if (e + 1) % int(val_every) == 0}
        got = {int(r["epoch"]) for r in rows if "epoch" in r and any(k.startswith("val/") for k in r)}
        missing = sorted(expected - got)
        if missing and not got:
            problems.append("no validation metrics logged")
        elif missing and missing[0] > max(got):
            problems.append(f"validation ends at epoch {max(got)}, the run trained {trained} epochs (0-{trained - 1})")
        elif missing:
            problems.append(f"validation is missing for epoch(s) {', '.join(map(str, missing[:8]))} of 0-{trained - 1}")
    return problems


def curve_warnings(cells: list[Cell]) -> list[str]:
    """``<cell id>: <problem>`` for every finished cell whose training curves are incomplete."""
    return [f"{cell.id}: {problem}" for cell in cells if cell.is_finished() for problem in curve_problems(cell.folder)]


def write_report(grid_dir: str | Path, metric: str = "recall@1", rows: list[str] | None = None, cols: str | None = None, plots: bool = True,
                 paired: str | None = None) -> Path:
    """Write ``report.md``, ``report.csv``, ``cells.csv`` and the PNGs into ``grid_dir/report``.

    ``paired="<axis>=<label>"`` adds the per-seed differences against that arm (``paired.csv`` and a section
    of ``report.md``; ``paired_differences``).
    """
    grid_dir = Path(grid_dir)
    grid, cells = load_grid(grid_dir)
    axes: dict[str, list[str]] = grid["axes"]
    jobs = load_baseline(grid_dir, grid)
    baseline_axes = [a for a in grid.get("baseline_axes") or [] if a in axes]
    sources = {c.done().get("source") or "" for c in cells if c.is_finished()}
    on_validation = bool(sources) and all("validation" in s for s in sources)  # compare like with like
    baseline_frame = baseline_table(jobs, validation=on_validation)
    baseline_agg = aggregate(baseline_frame, baseline_axes) if not baseline_frame.empty else None
    frame = cell_table(grid, cells)
    if frame.empty:
        raise FileNotFoundError(f"no cell of {grid_dir} has finished yet (no cells/*/done.json); run `hardneg grid` first")
    available = metric_columns(frame, list(axes))
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not among the final metrics of {grid_dir}: {[m for m in available if '/' not in m and m not in TIMES]}")
    row_axes, col_axis = layout(axes, rows, cols)
    agg = aggregate(frame, list(axes))
    paired_frame, paired_axis, paired_ref = None, None, None
    if paired is not None:
        paired_axis, sep, paired_ref = paired.partition("=")
        if not sep or not paired_ref:
            raise ValueError(f"paired must be <axis>=<label>, e.g. negatives=in_batch; got {paired!r}")
        paired_frame = paired_differences(frame, list(axes), paired_axis, paired_ref,
                                          [m for m in available if "/" not in m and m not in TIMES])
    out = grid_dir / "report"
    out.mkdir(exist_ok=True)

    n_seeds = len(grid["seeds"])
    fixed = [f"{a} = {labels[0]}" for a, labels in axes.items() if len(labels) == 1]
    unfinished = [c.id for c in [*jobs, *cells] if not c.is_finished()]
    warnings = curve_warnings(cells)
    for warning in warnings:
        print(f"hardneg report: warning: incomplete training curve of {warning}", file=sys.stderr)
    main_metrics = [m for m in available if "/" not in m and m not in TIMES]
    long_header = [*axes, "n", *main_metrics] + ([f"untrained {metric}"] if f"untrained/{metric}" in available else []) + ["minutes/cell", "CPU minutes/cell"]
    long_rows = []
    for _, r in (baseline_agg if baseline_agg is not None else pd.DataFrame()).iterrows():
        texts = [str(r[a]) if a in baseline_axes else "untrained" for a in axes] + [str(int(r["n"]))]
        texts += [format_mean_std(r.get(f"{m}_mean", math.nan), r.get(f"{m}_std", math.nan)) for m in main_metrics]
        texts += ["–"] * (len(long_header) - len(texts))
        long_rows.append(texts)
    for _, r in agg.iterrows():
        texts = [str(r[a]) for a in axes] + [str(int(r["n"]))]
        texts += [format_mean_std(r[f"{m}_mean"], r[f"{m}_std"]) for m in main_metrics]
        if f"untrained/{metric}" in available:
            texts.append(format_mean_std(r[f"untrained/{metric}_mean"], r[f"untrained/{metric}_std"]))
        for key in TIMES:
            minutes = r.get(f"{key}_mean", math.nan) / 60
            texts.append("–" if math.isnan(minutes) else f"{minutes:.1f}")
        long_rows.append(texts)
    source = {c.done().get("source") for c in cells if c.is_finished()}
    parts = [
        f"# Grid {grid['name']}: {metric}",
        "",
        f"Mean {PLUS_MINUS} sample std over seeds {grid['seeds']} ({len(cells) - len(unfinished)}/{len(cells)} cells finished); "
        f"final metrics from {', '.join(sorted(s for s in source if s))}." + (f" Fixed: {', '.join(fixed)}." if fixed else ""),
        "",
        pivot_markdown(agg, metric, axes, row_axes, col_axis, n_seeds, baseline_agg, baseline_axes),
        "",
        *baseline_note(grid, jobs, baseline_frame, baseline_axes, "validation" if on_validation else "test"),
        "## All final metrics",
        "",
        markdown_table(long_header, long_rows),
    ]
    if paired_frame is not None:
        ordered = [metric, *[m for m in available if "/" not in m and m not in TIMES and m != metric]]
        parts += ["", *paired_markdown(paired_frame, list(axes), paired_axis, paired_ref, ordered)]
    if unfinished:
        parts += ["", "## Not finished", "", *[f"- {c}" for c in unfinished]]
    if warnings:
        parts += ["", "## Warnings: incomplete training curves", "",
                  "The curves of these cells miss logged steps; `curves.png` averages the seeds that have them.", "",
                  *[f"- {w}" for w in warnings]]  # fmt: skip
    atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
    atomic_write_text(out / "report.csv", with_baseline(agg, baseline_agg).to_csv(index=False))
    atomic_write_text(out / "cells.csv", with_baseline(frame, baseline_frame).to_csv(index=False))
    if paired_frame is not None:
        atomic_write_text(out / "paired.csv", paired_frame.to_csv(index=False))
    if plots:
        from experiments.grid import report_plots

        baseline = report_plots.Baseline(baseline_agg, baseline_axes) if baseline_agg is not None else None
        report_plots.write_plots(out, grid, cells, frame, agg, metric, row_axes, col_axis, baseline=baseline)
    return out


def with_baseline(trained: pd.DataFrame, untrained: pd.DataFrame | None) -> pd.DataFrame:
    """``trained`` rows after ``untrained`` ones, told apart by a first column ``run``."""
    parts = [t.assign(run=run) for t, run in ((untrained, "untrained"), (trained, "trained")) if t is not None and not t.empty]
    table = pd.concat([p.astype({c: str for c in p.columns if isinstance(p[c].dtype, pd.CategoricalDtype)}) for p in parts], ignore_index=True)
    return table[["run", *(c for c in table.columns if c != "run")]]


def baseline_note(grid: dict[str, Any], jobs: list[Cell], baseline_frame: pd.DataFrame, baseline_axes: list[str], split: str = "test") -> list[str]:
    """A sentence under the main table saying what the ``untrained`` row is (or why it is missing)."""
    if not jobs:
        return ["No `untrained` row: this grid ran without baseline jobs (`baseline: false`, or a grid folder from before them).", ""]
    per = "".join(f" and {a}" for a in baseline_axes)
    done = 0 if baseline_frame.empty else len(baseline_frame)
    return [f"`untrained`: the encoder before training, on the {split} split like the cells (`hardneg test` without a checkpoint, "
            f"one run per seed{per}; {done}/{len(jobs)} finished, in `baseline/`).", ""]  # fmt: skip


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hardneg report", description="Tables (mean +/- std over seeds) and plots of a grid's results.")
    p.add_argument("grid_dir", help="the grid's output folder (holds grid.json)")
    p.add_argument("--metric", default="recall@1", help="final metric of the main table and plots (default recall@1)")
    p.add_argument("--rows", nargs="+", help="axes shown as rows (default: every varying axis but the last)")
    p.add_argument("--cols", help="axis shown as columns (default: the last varying axis)")
    p.add_argument("--no-plots", action="store_true", help="write only the tables")
    p.add_argument("--paired", metavar="AXIS=LABEL", help="also the per-seed differences against this arm, e.g. negatives=in_batch")
    args = p.parse_args(argv)
    try:
        out = write_report(args.grid_dir, args.metric, args.rows, args.cols, plots=not args.no_plots, paired=args.paired)
    except (FileNotFoundError, ValueError) as e:
        print(f"hardneg report: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"written to {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    return 0

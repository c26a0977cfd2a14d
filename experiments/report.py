"""``hardneg report GRID_DIR``: one table of a grid's final metrics (mean +/- std over seeds) and plots.

Writes into ``GRID_DIR/report/``:

- ``report.md``: the chosen metric with the grid's axes as rows and columns (the last axis that
  varies is the columns), then every final metric per combination, the untrained baseline when
  the runs measured it, and the cells that did not finish;
- ``report.csv``: one row per combination: the axes, ``n`` (seeds finished), ``<metric>_mean`` and
  ``<metric>_std`` for every metric; ``cells.csv``: one row per finished cell;
- PNGs (``experiments.report_plots``): the metric per combination with error bars, training curves
  (loss and validation metric), and the hardness of the mined pairs over training per run.

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

from experiments.atomic import atomic_write_text
from experiments.grid_cell import Cell

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


def pivot_markdown(agg: pd.DataFrame, metric: str, axes: dict[str, list[str]], rows: list[str], cols: str | None, n_seeds: int) -> str:
    def cell_text(match: pd.DataFrame) -> str:
        if match.empty:
            return "–"
        r = match.iloc[0]
        return format_mean_std(r[f"{metric}_mean"], r[f"{metric}_std"], int(r["n"]), n_seeds)

    def select(values: dict[str, str]) -> pd.DataFrame:
        mask = pd.Series(True, index=agg.index)
        for axis, label in values.items():
            mask &= agg[axis].astype(str) == label
        return agg[mask]

    row_keys = list(itertools.product(*(axes[a] for a in rows))) if rows else [()]
    col_keys = axes[cols] if cols else [metric]
    corner = " \\ ".join(filter(None, [" / ".join(rows), cols])) or "grid"
    table_rows = []
    for key in row_keys:
        values = dict(zip(rows, key))
        texts = [cell_text(select({**values, cols: c})) if cols else cell_text(select(values)) for c in col_keys]
        if all(t == "–" for t in texts):
            continue  # an excluded combination
        table_rows.append([" / ".join(key) or "all", *texts])
    return markdown_table([corner, *col_keys], table_rows)


def write_report(grid_dir: str | Path, metric: str = "recall@1", rows: list[str] | None = None, cols: str | None = None, plots: bool = True) -> Path:
    """Write ``report.md``, ``report.csv``, ``cells.csv`` and the PNGs into ``grid_dir/report``."""
    grid_dir = Path(grid_dir)
    grid, cells = load_grid(grid_dir)
    axes: dict[str, list[str]] = grid["axes"]
    frame = cell_table(grid, cells)
    if frame.empty:
        raise FileNotFoundError(f"no cell of {grid_dir} has finished yet (no cells/*/done.json); run `hardneg grid` first")
    available = metric_columns(frame, list(axes))
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not among the final metrics of {grid_dir}: {[m for m in available if '/' not in m and m not in TIMES]}")
    row_axes, col_axis = layout(axes, rows, cols)
    agg = aggregate(frame, list(axes))
    out = grid_dir / "report"
    out.mkdir(exist_ok=True)

    n_seeds = len(grid["seeds"])
    fixed = [f"{a} = {labels[0]}" for a, labels in axes.items() if len(labels) == 1]
    unfinished = [c.id for c in cells if not c.is_finished()]
    main_metrics = [m for m in available if "/" not in m and m not in TIMES]
    long_header = [*axes, "n", *main_metrics] + ([f"untrained {metric}"] if f"untrained/{metric}" in available else []) + ["minutes/cell", "CPU minutes/cell"]
    long_rows = []
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
        pivot_markdown(agg, metric, axes, row_axes, col_axis, n_seeds),
        "",
        "## All final metrics",
        "",
        markdown_table(long_header, long_rows),
    ]
    if unfinished:
        parts += ["", "## Not finished", "", *[f"- {c}" for c in unfinished]]
    atomic_write_text(out / "report.md", "\n".join(parts) + "\n")
    atomic_write_text(out / "report.csv", agg.to_csv(index=False))
    atomic_write_text(out / "cells.csv", frame.to_csv(index=False))
    if plots:
        from experiments import report_plots

        report_plots.write_plots(out, grid, cells, frame, agg, metric, row_axes, col_axis)
    return out


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="hardneg report", description="Tables (mean +/- std over seeds) and plots of a grid's results.")
    p.add_argument("grid_dir", help="the grid's output folder (holds grid.json)")
    p.add_argument("--metric", default="recall@1", help="final metric of the main table and plots (default recall@1)")
    p.add_argument("--rows", nargs="+", help="axes shown as rows (default: every varying axis but the last)")
    p.add_argument("--cols", help="axis shown as columns (default: the last varying axis)")
    p.add_argument("--no-plots", action="store_true", help="write only the tables")
    args = p.parse_args(argv)
    try:
        out = write_report(args.grid_dir, args.metric, args.rows, args.cols, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"hardneg report: {e}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"written to {out}: {', '.join(sorted(p.name for p in out.iterdir() if p.is_file()))}")
    return 0

"""The PNGs of ``hardneg report``: final metric with error bars, training curves, hardness of mining.

The untrained encoder (the grid's baseline jobs) is drawn as a dashed grey horizontal line labelled
``untrained`` (with a +/- std band over seeds) on the metric plot, and on the validation curves with
its validation score, so "did training help" is read off the plots.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from experiments.atomic import atomic_write  # noqa: E402
from experiments.grid.cell import Cell  # noqa: E402
from experiments.grid.run_folder import read_metrics_csv  # noqa: E402

AP_COLOR, AN_COLOR = "tab:blue", "tab:red"
BASELINE_COLOR = "0.35"


@dataclass
class Baseline:
    """The untrained encoder's scores: ``agg`` has one row per label combination of ``axes`` (the
    axes the baseline depends on; none: one row) with ``n`` and ``<metric>_mean`` / ``<metric>_std``
    (test metrics; ``val/<metric>`` for validation)."""

    agg: pd.DataFrame
    axes: list[str]

    def levels(self, column: str) -> list[tuple[dict[str, str], float, float]]:
        """``(labels, mean, std)`` per baseline row that has ``column``; std 0 when undefined."""
        if f"{column}_mean" not in self.agg:
            return []
        out = []
        for _, r in self.agg.iterrows():
            mean, std = float(r[f"{column}_mean"]), float(r[f"{column}_std"])
            if not np.isnan(mean):
                out.append(({a: str(r[a]) for a in self.axes}, mean, 0.0 if np.isnan(std) else std))
        return out


def draw_baseline(ax: plt.Axes, labels: dict[str, str], mean: float, std: float, x_range: tuple[float, float] | None = None) -> None:
    """A dashed horizontal line (across the axes, or over ``x_range``) with a +/- std band."""
    name = "untrained" + "".join(f", {a}={v}" for a, v in labels.items())
    if x_range is None:
        ax.axhline(mean, color=BASELINE_COLOR, ls="--", lw=1.2, label=name, zorder=0)
        if std > 0:
            ax.axhspan(mean - std, mean + std, color=BASELINE_COLOR, alpha=0.12, lw=0, zorder=0)
    else:
        ax.plot(x_range, [mean, mean], color=BASELINE_COLOR, ls="--", lw=1.2, label=name, zorder=0)
        if std > 0:
            ax.fill_between(x_range, mean - std, mean + std, color=BASELINE_COLOR, alpha=0.12, lw=0, zorder=0)


def file_name(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric.replace("@", "_at_"))


def save(fig: plt.Figure, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"), mode="wb")
    plt.close(fig)


def combo_label(labels: dict[str, str], varying: list[str]) -> str:
    return " / ".join(str(labels[a]) for a in varying) or "all"


def combinations(cells: list[Cell], varying: list[str]) -> dict[str, list[Cell]]:
    """Finished cells grouped by their labels on the varying axes, in grid order."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.is_finished():
            groups.setdefault(combo_label(cell.labels, varying), []).append(cell)
    return groups


def plot_metric(agg: pd.DataFrame, frame: pd.DataFrame, metric: str, row_axes: list[str], col_axis: str | None, grid: dict[str, Any],
                baseline: Baseline | None = None) -> plt.Figure:  # fmt: skip
    """Mean +/- std of ``metric`` per combination (rows on x, columns as colours), seeds as dots;
    the untrained ``baseline`` as a dashed line (over the combinations it applies to)."""
    row_keys = [" / ".join(str(r[a]) for a in row_axes) or "all" for _, r in agg.iterrows()]
    x_labels = list(dict.fromkeys(row_keys))
    col_labels = list(grid["axes"][col_axis]) if col_axis else [metric]
    width = 0.8 / len(col_labels)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(x_labels) * max(1, len(col_labels) / 2)), 3.6))
    colors = plt.get_cmap("tab10")
    positions: list[tuple[pd.Series, float]] = []
    for j, col in enumerate(col_labels):
        for i, (_, r) in enumerate(agg.iterrows()):
            if col_axis and str(r[col_axis]) != col:
                continue
            x = x_labels.index(row_keys[i]) + (j - (len(col_labels) - 1) / 2) * width
            positions.append((r, x))
            std = r[f"{metric}_std"]
            ax.errorbar(x, r[f"{metric}_mean"], yerr=0 if np.isnan(std) else std, fmt="o", color=colors(j % 10), capsize=4, ms=6,
                        label=col if col_axis else None)
            mask = pd.Series(True, index=frame.index)
            for a in [*row_axes, *([col_axis] if col_axis else [])]:
                mask &= frame[a].astype(str) == str(r[a])
            seeds = frame.loc[mask, metric].to_numpy(dtype=float)
            ax.scatter(np.full(len(seeds), x + width * 0.25), seeds, s=9, color=colors(j % 10), alpha=0.45, zorder=1)
    for labels, mean, std in baseline.levels(metric) if baseline else []:
        if not labels:
            draw_baseline(ax, labels, mean, std)
            continue
        xs = [x for r, x in positions if all(str(r[a]) == v for a, v in labels.items())]
        if xs:
            draw_baseline(ax, labels, mean, std, (min(xs) - width / 2, max(xs) + width / 2))
    ax.set_xticks(range(len(x_labels)), x_labels, rotation=15 if max(map(len, x_labels)) > 12 else 0)
    ax.set_xlabel(" / ".join(row_axes))
    ax.set_ylabel(f"test {metric}")
    ax.set_title(f"{metric} after training: mean ± std over seeds (dots: single seeds)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    if labels:
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), title=col_axis, fontsize=8, title_fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def mean_curve(cells: list[Cell], column: str) -> pd.DataFrame:
    """Mean and std over cells of ``column`` of their ``metrics.csv`` per step."""
    series = []
    for cell in cells:
        rows = [r for r in read_metrics_csv(cell.folder / "metrics.csv") if column in r]
        if rows:
            series.append(pd.Series({int(r["step"]): r[column] for r in rows}))
    if not series:
        return pd.DataFrame(columns=["mean", "std"])
    table = pd.concat(series, axis=1)
    return pd.DataFrame({"mean": table.mean(axis=1), "std": table.std(axis=1, ddof=1)}).sort_index()


def plot_curves(groups: dict[str, list[Cell]], metric: str, baseline: Baseline | None = None) -> plt.Figure:
    """Training loss and validation ``metric`` over steps, mean over seeds with a +/- std band; the
    untrained ``baseline``'s validation ``metric`` as a dashed line."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    for k, (label, cells) in enumerate(groups.items()):
        for ax, column in zip(axes, ("train/loss", f"val/{metric}")):
            curve = mean_curve(cells, column)
            if curve.empty:
                continue
            x = curve.index.to_numpy()
            ax.plot(x, curve["mean"], color=colors(k), label=label, marker="o" if len(curve) < 6 else None, ms=3)
            std = curve["std"].fillna(0).to_numpy()
            ax.fill_between(x, curve["mean"] - std, curve["mean"] + std, color=colors(k), alpha=0.15, lw=0)
    for labels, mean, std in baseline.levels(f"val/{metric}") if baseline else []:
        draw_baseline(axes[1], labels, mean, std)
    axes[0].set_title("training loss (mean ± std over seeds)", fontsize=10)
    axes[1].set_title(f"validation {metric}", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    if not axes[1].lines:  # the runs never validated (limit_val_batches=0: scored on the test split at the end only)
        axes[1].set_axis_off()
        axes[1].text(0.5, 0.5, f"no validation {metric} during training\n(the cells are scored on the test split at the end)",
                     ha="center", va="center", fontsize=9, color="0.4", transform=axes[1].transAxes)
    for ax in axes[::-1]:  # the validation panel, which also has the baseline, when it has curves
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    return fig


def read_hardness(cell: Cell) -> dict[str, Any] | None:
    path = cell.folder / "hardness.json"
    return json.loads(path.read_text()) if path.is_file() else None


def draw_bands(ax: plt.Axes, hardness: dict[str, Any]) -> None:
    """Median and 25-75 % / 5-95 % bands of s(a, p) and s(a, n) over training steps."""
    for kind, color, name in (("ap", AP_COLOR, "anchor-positive"), ("an", AN_COLOR, "anchor-negative")):
        steps = [s for s in hardness["steps"] if s.get(kind)]
        if not steps:
            continue
        x = np.array([s["step"] for s in steps])
        q = {key: np.array([s[kind][key] for s in steps]) for key in ("q05", "q25", "q50", "q75", "q95")}
        ax.fill_between(x, q["q05"], q["q95"], color=color, alpha=0.12, lw=0)
        ax.fill_between(x, q["q25"], q["q75"], color=color, alpha=0.3, lw=0)
        ax.plot(x, q["q50"], color=color, lw=1.2, label=f"{name} (median, 25-75%, 5-95%)")
    ax.set_ylim(-1.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine similarity")
    ax.grid(alpha=0.3)


def plot_hardness_run(cell: Cell, hardness: dict[str, Any]) -> plt.Figure:
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    draw_bands(left, hardness)
    left.set_title("similarity of mined pairs over training", fontsize=10)
    left.legend(fontsize=7, loc="lower left")
    edges = np.array(hardness["bin_edges"])
    epochs = hardness["epochs"]
    for epoch, style in ((epochs[0], "--"), (epochs[-1], "-")) if epochs else ():
        for kind, color in (("ap", AP_COLOR), ("an", AN_COLOR)):
            counts = np.array(epoch[kind], dtype=float)
            if counts.sum():
                right.stairs(counts / counts.sum(), edges, color=color, ls=style, label=f"{kind} epoch {epoch['epoch']}")
        if len(epochs) == 1:
            break
    right.set_title("distribution, first (dashed) and last epoch", fontsize=10)
    right.set_xlabel("cosine similarity")
    right.set_ylabel("fraction of mined pairs")
    right.legend(fontsize=7)
    fig.suptitle(cell.id, fontsize=10)
    return fig


def plot_hardness_overview(groups: dict[str, list[Cell]], ncols: int = 3) -> plt.Figure | None:
    """One panel per combination (its first finished seed), ``ncols`` per row."""
    runs = [(label, cells[0], read_hardness(cells[0])) for label, cells in groups.items()]
    runs = [r for r in runs if r[2]]
    if not runs:
        return None
    ncols = max(1, min(ncols, len(runs)))
    nrows = -(-len(runs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, (label, cell, hardness) in zip(axes.flat, runs):
        draw_bands(ax, hardness)
        ax.set_title(f"{label} (seed {cell.seed})", fontsize=9)
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.suptitle("cosine similarity of the mined anchor-positive (blue) and anchor-negative (red) pairs", fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(out: Path, grid: dict[str, Any], cells: list[Cell], frame: pd.DataFrame, agg: pd.DataFrame, metric: str, row_axes: list[str], col_axis: str | None,
                baseline: Baseline | None = None) -> list[Path]:  # fmt: skip
    varying = [*row_axes, *([col_axis] if col_axis else [])]
    groups = combinations(cells, varying)
    written = []
    path = out / f"{file_name(metric)}.png"
    save(plot_metric(agg, frame, metric, row_axes, col_axis, grid, baseline), path)
    written.append(path)
    path = out / "curves.png"
    save(plot_curves(groups, metric, baseline), path)
    written.append(path)
    overview = plot_hardness_overview(groups, ncols=len(grid["axes"][col_axis]) if col_axis else 3)
    if overview is not None:
        save(overview, out / "hardness.png")
        written.append(out / "hardness.png")
    for cell in cells:
        hardness = read_hardness(cell) if cell.is_finished() else None
        if hardness:
            path = out / "hardness" / f"{cell.folder.name}.png"
            path.parent.mkdir(exist_ok=True)
            save(plot_hardness_run(cell, hardness), path)
            written.append(path)
    return written

"""Reading a ``hardneg fit`` run folder: its logged metrics and its final retrieval metrics.

Only the standard library, so the grid driver and the report read runs without importing torch.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any


def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of Lightning's ``metrics.csv`` as ``{column: float}`` without the empty cells.

    A resumed run logs again the steps between its last checkpoint and the kill: for a repeated
    ``(step, column)`` the later value (the resumed run's) is kept. Rows are sorted by step.
    """
    path = Path(path)
    if not path.is_file():
        return []
    merged: dict[tuple[int, str], dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {}
            for key, text in row.items():
                if key is None or text in (None, ""):
                    continue
                try:
                    values[key] = float(text)
                except ValueError:
                    continue
            if "step" not in values:
                continue
            # Lightning writes training and validation values of one step on separate rows.
            kind = "val" if any(k.startswith("val/") for k in values) else "train"
            merged.setdefault((int(values["step"]), kind), {}).update(values)
    return [merged[k] for k in sorted(merged)]


def last_logged(rows: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The last logged value of every ``prefix/...`` column, keyed without the prefix."""
    out: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(prefix + "/") and not math.isnan(value):
                out[key[len(prefix) + 1 :]] = value
    return out


def final_metrics(folder: str | Path) -> dict[str, Any]:
    """The final metrics of a finished run.

    ``results.json`` (``RetrievalReport``: test metrics after training, and before if measured)
    when the run has it; otherwise the last logged ``val/*`` metrics of ``metrics.csv``.
    Returns ``{"metrics": {...}, "metrics_before": {...} | None, "source": str}``.
    """
    folder = Path(folder)
    results = folder / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        if data.get("after_training"):
            return {"metrics": data["after_training"], "metrics_before": data.get("before_training"), "source": "results.json (test, after training)"}
    logged = last_logged(read_metrics_csv(folder / "metrics.csv"), "val")
    if not logged:
        raise FileNotFoundError(
            f"run {folder} has neither results.json (add the experiments.callbacks.RetrievalReport callback) "
            f"nor val/* metrics in metrics.csv; the grid has no final metrics for it"
        )
    return {"metrics": logged, "metrics_before": None, "source": "metrics.csv (last validation)"}

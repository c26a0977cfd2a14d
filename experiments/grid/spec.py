"""``GridSpec``: a grid YAML file (base config + axes + seeds) and its expansion into cells.

A grid file::

    name: quickstart                   # optional; default: the file's stem
    output: runs/grids/quickstart      # optional; default: runs/grids/<name>
    base:                              # what every cell starts from, in order
      - experiments/quickstart/fashion_mnist.yaml
      - trainer.max_epochs=2
    axes:                              # each axis: label -> entry (or list of entries) ...
      miner:
        batch_hard: experiments/miner/batch_hard.yaml
        ms: experiments/miner/multi_similarity.yaml
      loss:                            # ... or a list of entries, labelled automatically
        - experiments/loss/triplet_margin.yaml
        - [experiments/loss/contrastive.yaml, model.init_args.loss.init_args.neg_margin=0.5]
    seeds: [0, 1, 2]                   # or a count: 3 means [0, 1, 2]
    seed_keys: [seed_everything, data.init_args.seed]   # default: [seed_everything]
    exclude:                           # drop every cell that matches all keys of a rule
      - {miner: ms, loss: triplet_margin}
    overrides: [trainer.enable_progress_bar=false]       # optional; applied after the axes
    baseline: true                     # optional; default true (see below)
    baseline_seeds: [0]                # optional; default: every seed

An entry is a config fragment (a path ending in ``.yaml``/``.yml``, composed with ``--config``
exactly as ``hardneg fit --config`` does; relative paths are looked up in the current folder, then
in the project root) or a ``key=value`` override (``--key=value``). Each cell's ``hardneg fit``
arguments are: base, one value per axis in axis order, overrides, then the seed keys, so the later
entries win as with repeated ``--config``; then ``GRID_CALLBACKS`` are appended. Automatic labels: a
fragment's file stem, an override's value, ``+``-joined for a list.

The **baseline** is the untrained encoder's score, the reference row of ``hardneg report``. The grid
measures it in baseline jobs that it runs before the cells: ``hardneg test`` without a checkpoint,
with the entries and seed of the first cell it stands for, in ``output/baseline/<name>/``. One per
seed: the seed sets the random parts of the untrained model (e.g. the embedding head), so the
baseline of seed ``s`` is exactly the model the cells of seed ``s`` start from, and trained minus
untrained compares like with like; it costs one test evaluation per seed instead of one per cell.
``baseline: false`` runs none; ``baseline: [encoder, dataset]`` runs one per seed and per label of
those axes: list the axes whose entries change the untrained model or the test data.
``baseline_seeds`` limits the baseline jobs to these seeds: for an untrained model no seed changes
(a packaged encoder without a random head, a fixed split) one evaluation is the whole baseline.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from experiments.grid.cell import Cell

PROJECT_ROOT = Path(__file__).resolve().parents[2]
KEYS = {"name", "output", "base", "axes", "seeds", "seed_keys", "exclude", "overrides", "baseline", "baseline_seeds"}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]*$")
AXIS = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Appended to every cell after its entries: the hardness diagnostic of the report and the progress
# the grid shows. Do not configure them in a grid's configs too (Lightning refuses two stateful
# callbacks of one class).
GRID_CALLBACKS = ("experiments.callbacks.HardnessMonitor", "experiments.callbacks.ProgressFile")
# Appended to every baseline job (``hardneg test``): writes its test and validation metrics.
BASELINE_CALLBACKS = ("experiments.callbacks.UntrainedBaseline",)


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_") or "value"


def _is_fragment(entry: str) -> bool:
    return entry.endswith((".yaml", ".yml"))


def _auto_label(entries: list[str]) -> str:
    parts = [Path(e).stem if _is_fragment(e) else e.split("=", 1)[1] for e in entries]
    return _sanitize("+".join(parts))


@dataclass(frozen=True)
class GridSpec:
    """A parsed grid file. ``load`` validates it; ``cells`` expands it.

    Args:
        source: the grid file.
        name: the grid's name.
        output: the grid's output folder (cells under ``output/cells/``).
        base, overrides: entries every cell gets, before and after the axes.
        axes: axis name -> {label: entries}, in file order.
        seeds: the seeds every combination runs with.
        seed_keys: the config keys set to the seed (``--key=seed``).
        exclude: rules axis -> labels; a combination matching every key of one rule is dropped.
        baseline: the axes the untrained-encoder baseline depends on (one baseline job per seed and
            label combination of them), or ``None`` for no baseline.
        baseline_seeds: the seeds of the baseline jobs (``None``: every seed).
    """

    source: Path
    name: str
    output: Path
    base: tuple[str, ...]
    axes: dict[str, dict[str, tuple[str, ...]]]
    seeds: tuple[int, ...]
    seed_keys: tuple[str, ...]
    exclude: tuple[dict[str, tuple[str, ...]], ...]
    overrides: tuple[str, ...] = ()
    baseline: tuple[str, ...] | None = ()
    baseline_seeds: tuple[int, ...] | None = None

    # ----------------------------------------------------------------------------- parsing
    @classmethod
    def load(cls, path: str | Path, output: str | Path | None = None) -> "GridSpec":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"grid file {path} does not exist; expected a YAML file like experiments/grids/quickstart.yaml")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"grid file {path}: expected a mapping with keys {sorted(KEYS)}, got {type(raw).__name__}")
        unknown = set(raw) - KEYS
        if unknown:
            raise ValueError(f"grid file {path}: unknown keys {sorted(unknown)}; expected some of {sorted(KEYS)}")
        where = f"grid file {path}"
        name = str(raw.get("name") or path.stem)
        if not NAME.match(name):
            raise ValueError(f"{where}: name {name!r} must be letters, digits, '_', '.', '+' or '-'")
        axes = cls._parse_axes(raw.get("axes"), where)
        seeds = cls._parse_seeds(raw.get("seeds", [0]), where)
        exclude = cls._parse_exclude(raw.get("exclude") or [], axes, where)
        spec = cls(
            source=path,
            name=name,
            output=Path(output if output is not None else raw.get("output") or Path("runs") / "grids" / name),
            base=cls._parse_entries(raw.get("base") or [], f"{where}, base"),
            axes=axes,
            seeds=seeds,
            seed_keys=tuple(str(k).lstrip("-") for k in raw.get("seed_keys") or ["seed_everything"]),
            exclude=exclude,
            overrides=cls._parse_entries(raw.get("overrides") or [], f"{where}, overrides"),
            baseline=cls._parse_baseline(raw.get("baseline", True), axes, where),
            baseline_seeds=None if raw.get("baseline_seeds") is None else cls._parse_seeds(raw["baseline_seeds"], f"{where}, baseline_seeds"),
        )
        if spec.baseline_seeds is not None and not set(spec.baseline_seeds) <= set(seeds):
            raise ValueError(f"{where}: baseline_seeds {list(spec.baseline_seeds)} must be among the seeds {list(seeds)}")
        if not spec.combinations():
            raise ValueError(f"{where}: the exclude rules remove every combination of {list(axes)}")
        for entry in spec.all_entries():
            spec.resolve(entry)  # fail now, naming the entry, rather than in a Ray worker
        return spec

    @staticmethod
    def _parse_entries(value: Any, where: str) -> tuple[str, ...]:
        entries = value if isinstance(value, list) else [value]
        out = []
        for e in entries:
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"{where}: entry {e!r} must be a config fragment path (.yaml) or a key=value override")
            e = e.strip()
            if not _is_fragment(e) and "=" not in e:
                raise ValueError(f"{where}: entry {e!r} is neither a .yaml/.yml config fragment nor a key=value override")
            out.append(e)
        return tuple(out)

    @classmethod
    def _parse_axes(cls, value: Any, where: str) -> dict[str, dict[str, tuple[str, ...]]]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: axes must be a mapping axis name -> values, got {type(value).__name__}")
        axes: dict[str, dict[str, tuple[str, ...]]] = {}
        for axis, values in value.items():
            axis = str(axis)
            if not AXIS.match(axis) or axis == "seed":
                raise ValueError(f"{where}: axis name {axis!r} must be an identifier other than 'seed'")
            if not values:
                raise ValueError(f"{where}: axis {axis!r} has no values")
            items = values.items() if isinstance(values, dict) else [(None, v) for v in values]
            labelled: dict[str, tuple[str, ...]] = {}
            for label, spec in items:
                entries = cls._parse_entries(spec, f"{where}, axis {axis!r}")
                label = _auto_label(list(entries)) if label is None else str(label)
                if not NAME.match(label):
                    raise ValueError(f"{where}: axis {axis!r} label {label!r} must be letters, digits, '_', '.', '+' or '-'")
                if label in labelled:
                    raise ValueError(f"{where}: axis {axis!r} has two values labelled {label!r}; give them names (label: entry)")
                labelled[label] = entries
            axes[axis] = labelled
        return axes

    @staticmethod
    def _parse_seeds(value: Any, where: str) -> tuple[int, ...]:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise ValueError(f"{where}: seeds: {value} must be a positive count or a list of ints")
            return tuple(range(value))
        if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
            raise ValueError(f"{where}: seeds must be a positive count or a non-empty list of ints, got {value!r}")
        if len(set(value)) != len(value):
            raise ValueError(f"{where}: seeds {value} repeat a seed")
        return tuple(value)

    @staticmethod
    def _parse_baseline(value: Any, axes: dict[str, dict[str, tuple[str, ...]]], where: str) -> tuple[str, ...] | None:
        if value is True or value is None:
            return ()
        if value is False:
            return None
        names = value if isinstance(value, list) else [value]
        for name in names:
            if name not in axes:
                raise ValueError(f"{where}: baseline: {name!r} is not an axis; give true, false or a list of the axes {list(axes)} the untrained model depends on")
        return tuple(a for a in axes if a in names)  # in axis order

    @staticmethod
    def _parse_exclude(value: Any, axes: dict[str, dict[str, tuple[str, ...]]], where: str) -> tuple[dict[str, tuple[str, ...]], ...]:
        if not isinstance(value, list):
            raise ValueError(f"{where}: exclude must be a list of rules like {{axis: label}}")
        rules = []
        for i, rule in enumerate(value):
            if not isinstance(rule, dict) or not rule:
                raise ValueError(f"{where}: exclude rule {i} must be a non-empty mapping axis -> label(s), got {rule!r}")
            parsed = {}
            for axis, labels in rule.items():
                if axis not in axes:
                    raise ValueError(f"{where}: exclude rule {i} names axis {axis!r}; the axes are {list(axes)}")
                labels = tuple(str(v) for v in (labels if isinstance(labels, list) else [labels]))
                for label in labels:
                    if label not in axes[axis]:
                        raise ValueError(f"{where}: exclude rule {i} names {axis}={label}; {axis} has {list(axes[axis])}")
                parsed[axis] = labels
            rules.append(parsed)
        return tuple(rules)

    # --------------------------------------------------------------------------- expansion
    def combinations(self) -> list[dict[str, str]]:
        """Axis label combinations (cartesian product in file order) left after ``exclude``."""
        names = list(self.axes)
        out = []
        for labels in itertools.product(*(list(self.axes[a]) for a in names)):
            combo = dict(zip(names, labels))
            if not any(all(combo[a] in allowed for a, allowed in rule.items()) for rule in self.exclude):
                out.append(combo)
        return out

    def all_entries(self) -> list[str]:
        return [*self.base, *(e for values in self.axes.values() for es in values.values() for e in es), *self.overrides]

    def resolve(self, entry: str) -> list[str]:
        """``hardneg fit`` arguments for one entry: ``--config PATH`` or ``--key=value``."""
        if not _is_fragment(entry):
            return [f"--{entry.lstrip('-')}"]
        path = Path(entry).expanduser()
        candidates = [path] if path.is_absolute() else [Path.cwd() / path, PROJECT_ROOT / path]
        for candidate in candidates:
            if candidate.is_file():
                return ["--config", str(candidate.resolve())]
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(f"grid {self.source}: config fragment {entry!r} not found (tried {tried})")

    def cells(self) -> list[Cell]:
        """Every cell: combinations x seeds, in that order; folders under ``output/cells/``."""
        cells = []
        for combo in self.combinations():
            for seed in self.seeds:
                entries = [*self.base, *(e for axis, label in combo.items() for e in self.axes[axis][label]), *self.overrides]
                entries += [f"{key}={seed}" for key in self.seed_keys]
                argv = ["fit"] + [arg for e in entries for arg in self.resolve(e)]
                argv += [f"--trainer.callbacks+={callback}" for callback in GRID_CALLBACKS]
                folder_name = "__".join([*(f"{a}-{v}" for a, v in combo.items()), f"seed-{seed}"])
                cells.append(Cell(labels=combo, seed=seed, entries=tuple(entries), argv=tuple(argv), folder=self.output.resolve() / "cells" / folder_name))
        return cells

    def baseline_cells(self) -> list[Cell]:
        """The baseline jobs: per label combination of the ``baseline`` axes (that some cell has) and
        seed, ``hardneg test`` of the untrained model with the entries of the first such cell."""
        if self.baseline is None:
            return []
        jobs: dict[tuple[tuple[str, str], ...], Cell] = {}
        for cell in self.cells():
            if self.baseline_seeds is not None and cell.seed not in self.baseline_seeds:
                continue
            labels = {axis: cell.labels[axis] for axis in self.baseline}
            key = (*labels.items(), ("seed", str(cell.seed)))
            if key in jobs:
                continue
            argv = ["test"] + [arg for e in cell.entries for arg in self.resolve(e)]
            argv += [f"--trainer.callbacks+={callback}" for callback in BASELINE_CALLBACKS]
            folder_name = "__".join([*(f"{a}-{v}" for a, v in labels.items()), f"seed-{cell.seed}"])
            jobs[key] = Cell(labels=labels, seed=cell.seed, entries=cell.entries, argv=tuple(argv),
                             folder=self.output.resolve() / "baseline" / folder_name, kind="baseline")  # fmt: skip
        return list(jobs.values())

    def jobs(self) -> list[Cell]:
        """Everything ``hardneg grid`` runs, baselines first."""
        return [*self.baseline_cells(), *self.cells()]

    def record(self) -> dict[str, Any]:
        """What ``grid.json`` stores: the axes with their labels in order, the seeds, the cells and the
        baseline jobs."""
        return {
            "name": self.name,
            "source": str(self.source.resolve()),
            "axes": [{"name": axis, "labels": list(values)} for axis, values in self.axes.items()],  # a list: keeps the order
            "seeds": list(self.seeds),
            "baseline_axes": None if self.baseline is None else list(self.baseline),
            "cells": [c.record() for c in self.cells()],
            "baseline": [c.record() for c in self.baseline_cells()],
        }

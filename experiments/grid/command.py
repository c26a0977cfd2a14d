"""``hardneg grid FILE``: run every cell of a grid on Ray Tune, resuming where an earlier run stopped.

The grid is expanded (``GridSpec``), the finished cells (with ``done.json``) are skipped, and the
others run as one ``tune.Tuner`` whose ``param_space`` is a ``tune.grid_search`` over them, each
cell with ``--cpus-per-run`` / ``--gpus-per-run`` Ray resources. Ray is a local instance by default
(``--num-cpus`` CPUs, no dashboard) or an existing cluster (``--address``; its nodes must see the
project and the output folder at the same paths, e.g. a shared file system: nothing is uploaded).
Resuming is ours, not Tune's: rerunning the same command recomputes what is left from the cell
folders, so it works after any crash, also one that left Tune's own state torn.

The untrained-encoder baseline (``GridSpec.baseline_cells``: ``hardneg test`` once per seed by
default) runs as jobs of the same search, listed first, so it is measured once for the whole grid
rather than at the start of every cell, and is done, locked and resumed like a cell.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

from experiments.atomic import atomic_write_json
from experiments.grid.spec import GridSpec


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hardneg grid", description="Run the cells of a grid YAML file on Ray Tune; rerun to resume.")
    p.add_argument("file", help="grid YAML file, e.g. experiments/grids/quickstart.yaml")
    p.add_argument("--output", help="output folder (default: the file's output:, else runs/grids/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the cells, their state and their hardneg fit command; run nothing")
    p.add_argument("--address", help="address of an existing Ray cluster (default: start a local Ray instance)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs of the local Ray instance (default: Ray detects them)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPUs per cell, also its torch threads (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0, help="Ray GPUs per cell (default 0)")
    p.add_argument("--max-concurrent", type=int, default=None, help="at most this many cells at once (default: as resources allow)")
    p.add_argument("--max-failures", type=int, default=0, help="retry a failed cell this many times within the run (it resumes from its checkpoint)")
    p.add_argument("--metric", default="recall@1", help="final metric shown in the progress lines")
    return p.parse_args(argv)


def describe(spec: GridSpec) -> str:
    n_combos = len(spec.combinations())
    axes = " x ".join(f"{len(v)} {a}" for a, v in spec.axes.items()) or "no axes"
    product = math.prod(len(v) for v in spec.axes.values())
    excluded = f" - {product - n_combos} excluded" if product != n_combos else ""
    n_baseline = len(spec.baseline_cells())
    per = " per ".join(["seed", *(spec.baseline or ())][::-1]) if spec.baseline else "seed"
    if spec.baseline_seeds is not None:
        per = f"{per} of {list(spec.baseline_seeds)}"
    baseline = f" + {n_baseline} untrained-baseline evaluation{'s' if n_baseline != 1 else ''} (one per {per})" if n_baseline else ""
    return f"grid {spec.name}: {n_combos * len(spec.seeds)} cells = ({axes}{excluded}) x {len(spec.seeds)} seeds{baseline} -> {spec.output}"


def dry_run(spec: GridSpec) -> int:
    print(describe(spec))
    for i, cell in enumerate(spec.jobs(), 1):
        print(f"{i:4d}  {cell.state():<9}  {cell.id}")
        print(f"      hardneg {' '.join(cell.fit_argv(cell.can_resume()))}")
    return 0


def _trial_name(trial) -> str:
    return trial.config["cell"]["id"]


def _trial_dirname(trial) -> str:
    return trial.config["cell"]["name"]


def run(spec: GridSpec, args: argparse.Namespace) -> int:
    cells = spec.jobs()  # the baseline jobs first: the cells' reference, and cheap
    changed = [c for c in cells if c.recorded_entries() not in (None, list(c.entries))]
    if changed:
        names = "\n  ".join(f"{c.id}: was {c.recorded_entries()}" for c in changed[:5])
        print(
            f"hardneg grid: {len(changed)} cell folder(s) in {spec.output} were run with other entries than {spec.source} "
            f"gives now:\n  {names}\nRun the changed grid in a new folder (--output), or delete those cells.",
            file=sys.stderr,
        )
        return 2
    spec.output.mkdir(parents=True, exist_ok=True)
    atomic_write_json(spec.output / "grid.json", spec.record())
    shutil.copyfile(spec.source, spec.output / "grid.yaml")
    pending = [c for c in cells if not c.is_finished()]
    resumable = sum(c.can_resume() for c in pending)
    trained = [c for c in pending if not c.is_baseline]  # the counts are of training cells; baselines apart
    baselines = spec.baseline_cells()
    todo = len(pending) - len(trained)
    baseline = f"; untrained baseline: {len(baselines) - todo}/{len(baselines)} done" if baselines else ""
    print(f"{describe(spec)}\n{len(cells) - len(baselines) - len(trained)} finished, {resumable} to resume, {len(trained) - resumable} to start{baseline}", flush=True)
    if not pending:
        print(f"nothing to run; the table: hardneg report {spec.output}")
        return 0

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's own progress tables off (verbose=0)
    import ray
    from ray import tune

    from experiments.grid.progress import GridProgress, format_seconds
    from experiments.grid.runner import PROJECT_ROOT, ray_trainable

    cwd = Path.cwd()
    pythonpath = os.pathsep.join(dict.fromkeys([str(PROJECT_ROOT), str(cwd), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
    if args.address:
        ray.init(address=args.address, runtime_env=runtime_env, logging_level=logging.WARNING, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=args.num_cpus or os.cpu_count(),
            num_gpus=args.num_gpus,
            include_dashboard=False,
            object_store_memory=256 * 1024**2,
            runtime_env=runtime_env,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # a failed cell is reported by GridProgress
    try:
        resources = ray.cluster_resources()
        slots = int(resources.get("CPU", 1) // args.cpus_per_run) if args.cpus_per_run > 0 else len(pending)
        if args.gpus_per_run > 0:
            slots = min(slots, int(resources.get("GPU", 0) // args.gpus_per_run))
        if slots < 1:
            print(f"hardneg grid: the Ray cluster ({resources}) cannot fit one cell of {args.cpus_per_run} CPUs / {args.gpus_per_run} GPUs", file=sys.stderr)
            return 2
        slots = min(slots, args.max_concurrent or slots, len(pending))
        progress = GridProgress(total=len(cells), already_done=len(cells) - len(pending), slots=slots, metric=args.metric)
        threads = max(1, int(args.cpus_per_run))
        tuner = tune.Tuner(
            tune.with_resources(ray_trainable, {"cpu": args.cpus_per_run, "gpu": args.gpus_per_run}),
            param_space={"cell": tune.grid_search([c.record() for c in pending]), "cwd": str(cwd), "threads": threads},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=args.max_concurrent,
                reuse_actors=True,  # a cell's state lives in its child process; the worker keeps none
                trial_name_creator=_trial_name,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=time.strftime("session-%Y%m%d-%H%M%S"),
                storage_path=str((spec.output / "ray").resolve()),
                verbose=0,
                callbacks=[progress],
                failure_config=tune.FailureConfig(max_failures=args.max_failures),
            ),
        )
        start = time.monotonic()
        tuner.fit()
        elapsed = time.monotonic() - start
    finally:
        ray.shutdown()
    unfinished = [c for c in cells if not c.is_finished()]
    left = sum(not c.is_baseline for c in unfinished)
    baseline = f", {len(baselines) - (len(unfinished) - left)}/{len(baselines)} baseline evaluations" if baselines else ""
    n_cells = len(cells) - len(baselines)
    print(f"grid {spec.name}: {n_cells - left}/{n_cells} cells finished{baseline}; this run took {format_seconds(elapsed)}")
    if unfinished:
        print(f"not finished: {', '.join(c.id for c in unfinished)}\nrerun the same command to resume them", file=sys.stderr)
        return 1
    print(f"the table and plots: hardneg report {spec.output}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        spec = GridSpec.load(args.file, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"hardneg grid: {e}", file=sys.stderr)
        return 2
    return dry_run(spec) if args.dry_run else run(spec, args)

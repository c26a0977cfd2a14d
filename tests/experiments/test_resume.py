"""A run killed with SIGKILL resumes from its last checkpoint with ``--ckpt_path last`` and keeps its logs:
``metrics.csv`` has every step of the whole run exactly once, the rows logged before the checkpoint as
they were, and the rows logged between the checkpoint and the kill replaced by the resumed run's."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 12, 5


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v} for row in csv.DictReader(f)]


def steps_of(rows: list[dict[str, str]], column: str) -> list[int]:
    return [int(row["step"]) for row in rows if column in row]


def fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "experiments.cli", "fit",
        "--config", "tests/configs/digits_tiny.yaml",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_epochs={EPOCHS}",
        f"--data.init_args.num_batches={BATCHES}",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_from_last(tmp_path):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = fit(run_dir)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, map_location="cpu", weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = torch.load(last, map_location="cpu", weights_only=False)
    killed_step = killed["global_step"]
    assert 0 < killed_step < EPOCHS * BATCHES
    logged_step = killed["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]
    before_kill = read_rows(run_dir / "metrics.csv")
    kept = [row for row in before_kill if int(row["step"]) < logged_step]
    assert steps_of(kept, "train/loss") == list(range(logged_step))
    # Rows logged after the checkpoint (the kill can land later than here) and a row torn by the kill.
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    with open(run_dir / "metrics.csv", "a") as f:
        for step in (logged_step, logged_step + 1):
            f.write(",".join({"step": str(step), "train/loss": "999.0", "epoch": "0"}.get(c, "") for c in header) + "\n")
        f.write(f"0,{logged_step + 2},99")

    # Starting again without --ckpt_path must not overwrite the interrupted run.
    refused = fit(run_dir)
    out, _ = refused.communicate(timeout=240)
    assert refused.returncode != 0 and "--ckpt_path last" in out

    resumed = fit(run_dir, "--ckpt_path", "last")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "Restoring states from the checkpoint" in out or "Restored all states" in out, out
    final = torch.load(last, map_location="cpu", weights_only=False)
    assert final["global_step"] == EPOCHS * BATCHES
    assert (run_dir / "config.yaml").exists()
    rows = read_rows(run_dir / "metrics.csv")
    assert steps_of(rows, "train/loss") == list(range(EPOCHS * BATCHES))  # every step, once
    assert steps_of(rows, "val/recall@1") == [(e + 1) * BATCHES - 1 for e in range(EPOCHS)]
    assert rows[: len(kept)] == kept  # the rows logged before the checkpoint, unchanged
    assert not any(row.get("train/loss") in ("999.0", "99") for row in rows)

    # Resuming the finished run trains nothing and keeps the file as it is.
    text = (run_dir / "metrics.csv").read_text()
    again = fit(run_dir, "--ckpt_path", "last")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    assert (run_dir / "metrics.csv").read_text() == text

"""A run killed with SIGKILL resumes from its last checkpoint with ``--ckpt_path last``."""

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


def fit(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "experiments.cli", "fit",
        "--config", "tests/configs/digits_tiny.yaml",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.max_epochs={EPOCHS}",
        f"--data.init_args.num_batches={BATCHES}",
        "--trainer.limit_val_batches=1",
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
    killed_step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < killed_step < EPOCHS * BATCHES

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
    with open(run_dir / "metrics.csv") as f:
        steps = [int(row["step"]) for row in csv.DictReader(f) if row["step"]]
    assert max(steps) >= EPOCHS * BATCHES - 1

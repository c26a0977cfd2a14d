"""A failed grid cell is reported with its error line; the grid's untrained baseline end to end.

``last_error`` on typical outputs; a cell whose ``hardneg fit`` fails on purpose (an encoder that
raises) quoted by ``run_cell`` and by the progress line; and, marked slow, a real grid on Ray with
its baseline job, a good cell and a failing one, then ``hardneg report``.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from experiments.grid.cell import last_error
from experiments.grid.spec import GridSpec

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = "this encoder fails on purpose"
FAILING_ENCODER = f'''
from tests.helpers import TinyEncoder


class FailingEncoder(TinyEncoder):
    def forward(self, x):
        raise ValueError("{MESSAGE}")
'''
TINY = "model.init_args.encoder.class_path=tests.helpers.TinyEncoder"
BROKEN = "model.init_args.encoder.class_path=failing_encoder.FailingEncoder"


def test_last_error_finds_the_exception_line():
    chained = (
        "Epoch 0: 100%\nTraceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    f()\nKeyError: 'x'\n\n"
        "During handling of the above exception, another exception occurred:\n\n"
        "Traceback (most recent call last):\n  File \"b.py\", line 2, in g\n    raise ValueError('bad')\n    ^^^^^^^^^^^^^^^^^\n"
        "ValueError: margin must be positive, got -1\n"
    )
    assert last_error(chained) == "ValueError: margin must be positive, got -1"
    usage = "usage: hardneg [-h] ...\nerror: Parser key \"model\":\n  Does not validate against any of the types\n"
    assert last_error(usage) == 'error: Parser key "model":'
    refused = "hardneg fit: runs/x/checkpoints already holds checkpoints of an earlier run"
    assert last_error(f"{chained}\nWARNING something\n{refused}\n") == refused  # hardneg's own message, after a traceback
    assert last_error("Epoch 1: 100%\n") is None
    assert last_error("Traceback (most recent call last):\n  File \"x\"\nRuntimeError: " + "y" * 500, max_chars=40) == "RuntimeError: " + "y" * 23 + "..."


def failing_grid(tmp_path: Path, **changes) -> Path:
    (tmp_path / "failing_encoder.py").write_text(FAILING_ENCODER)
    grid = {
        "base": ["tests/configs/digits_tiny.yaml", "data.init_args.num_batches=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"],
        "axes": {"encoder": {"tiny": TINY, "broken": BROKEN}},
        "seeds": 1,
        **changes,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_a_failed_cell_quotes_its_error(tmp_path, monkeypatch):
    from experiments.grid.progress import GridProgress
    from experiments.grid.runner import CellFailed, run_cell

    monkeypatch.chdir(ROOT)
    spec = GridSpec.load(failing_grid(tmp_path), output=tmp_path / "out")
    broken = next(c for c in spec.cells() if c.labels["encoder"] == "broken")
    with pytest.raises(CellFailed) as info:
        run_cell(broken, cwd=tmp_path, threads=1)
    assert f"hardneg fit exited with status 1 (ValueError: {MESSAGE})" in str(info.value)
    assert broken.last_error() == f"ValueError: {MESSAGE}"

    lines = []
    progress = GridProgress(total=3, already_done=0, slots=1, echo=lines.append)
    progress.on_trial_error(0, [], SimpleNamespace(trial_id="t0", config={"cell": broken.record()}))
    assert f"FAILED encoder=broken,seed=0 (exit status 1): ValueError: {MESSAGE}; see {broken.folder / 'stdout.log'}" in lines[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grid_with_baseline_and_a_failing_cell(tmp_path):
    path, out = failing_grid(tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-m", "experiments.cli", "grid", str(path), "--output", str(out), "--num-cpus", "2", "--cpus-per-run", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=540)
    log = run.stdout
    assert run.returncode == 1, log  # one cell failed
    assert "+ 1 untrained-baseline evaluation (one per seed)" in log, log
    assert f"FAILED encoder=broken,seed=0 (exit status 1): ValueError: {MESSAGE}; see" in log, log
    assert "finished baseline,seed=0" in log and "finished encoder=tiny,seed=0" in log, log
    baseline = out / "baseline" / "seed-0"
    assert (baseline / "done.json").is_file() and not (baseline / "checkpoints").exists()  # no training
    done = yaml.safe_load((baseline / "done.json").read_text())
    assert done["kind"] == "baseline" and 0 <= done["metrics"]["recall@1"] <= 1 and 0 <= done["metrics_val"]["recall@1"] <= 1

    from experiments.grid.report import write_report

    text = (write_report(out) / "report.md").read_text()
    # No RetrievalReport here: the cells' final metrics are their last validation, and so is the baseline's row.
    assert f"| untrained | {done['metrics_val']['recall@1']:.4f} |" in text, text
    assert "| tiny |" in text and "- encoder=broken,seed=0" in text, text  # the failed cell: not finished

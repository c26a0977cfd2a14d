"""``hardneg test`` after ``hardneg fit`` keeps the training run's files intact."""

import hashlib
from pathlib import Path

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_test_subcommand_logs_beside_the_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    common = ["--config", "tests/configs/digits_tiny.yaml", f"--trainer.default_root_dir={run}"]
    trainer = run_cli(["fit", *common, "--data.init_args.num_batches=2", "--trainer.limit_val_batches=1"])
    assert trainer.global_step == 2 * trainer.max_epochs
    before = {name: digest(run / name) for name in ("metrics.csv", "config.yaml")}
    run_cli(["test", *common, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert {name: digest(run / name) for name in before} == before
    (test_dir,) = [p for p in run.iterdir() if p.name.startswith("test-")]
    assert "test/recall@1" in (test_dir / "metrics.csv").read_text()
    assert (test_dir / "config.yaml").exists()

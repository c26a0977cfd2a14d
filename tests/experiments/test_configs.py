"""Every config under ``experiments/`` instantiates and runs one ``fast_dev_run`` step.

- Complete run configs (``quickstart/`` ...) run as they are.
- Fragments (``miner/``, ``loss/``, ``encoder/``, ``mixing/``, ``training/``) run on top of the seconds-long digits config.
- Paper recipes (``recipes/``) need their benchmark's folder: ``tests/experiments/test_recipes.py``
  runs them on generated miniature copies of the official formats.
- Grids (``grids/``) are not LightningCLI configs; the grid tests expand them.
- The text and image-text run configs (``text/``, ``clip/``) run on shrunken data in ``test_regime_configs.py``;
  the mining fragments (``mining/``) on top of the text config in ``test_mining_fragments.py``.
"""

from pathlib import Path

import pytest
import yaml

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ROOT / "experiments"
BASE = ROOT / "tests" / "configs" / "digits_tiny.yaml"
FRAGMENT_DIRS = ("miner", "loss", "encoder", "mixing", "training")
ELSEWHERE = ("recipes", "grids", "text", "clip", "mining")  # text/, clip/: test_regime_configs.py; mining/: test_mining_fragments.py


def configs(kind: str) -> list[Path]:
    out = []
    for path in sorted(EXPERIMENTS.rglob("*.yaml")):
        top = path.relative_to(EXPERIMENTS).parts[0]
        if top in ELSEWHERE:
            continue
        if (top in FRAGMENT_DIRS) == (kind == "fragment"):
            out.append(path)
    return out


def fragment_overrides(path: Path) -> list[str]:
    """Fit a fragment to the digits base: proxy losses need its class count and embedding size."""
    loss = (yaml.safe_load(path.read_text()).get("model") or {}).get("loss") or {}
    args = loss.get("init_args") or {}
    extra = []
    if "num_classes" in args:
        extra.append("--model.init_args.loss.init_args.num_classes=5")
    if "embedding_size" in args:
        extra.append("--model.init_args.loss.init_args.embedding_size=16")
    return extra


def fast_dev_run(tmp_path: Path, configs: list[Path], *extra: str) -> None:
    argv = ["fit"]
    for c in configs:
        argv += ["--config", str(c)]
    argv += [
        "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
        "--data.init_args.num_workers=0",
        *extra,
    ]
    run_cli(argv)  # finished, stepped, finite loss


def test_there_are_configs():
    assert configs("run"), "no run configs under experiments/"


@pytest.mark.parametrize("path", configs("run"), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_run_config(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    fast_dev_run(tmp_path, [path], "--data.init_args.eval_batch_size=32")


@pytest.mark.parametrize("path", configs("fragment"), ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_fragment_on_digits(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    fast_dev_run(tmp_path, [BASE, path], *fragment_overrides(path))

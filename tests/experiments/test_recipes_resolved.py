"""The paper recipes resolve to exactly the configuration they had before they were split into shared parts.

``experiments/recipes/`` composes each recipe from a paper base, a dataset part and a loss part
(``metrix/``, ``mlrc/``). This test resolves every recipe the way ``hardneg fit --config RECIPE
--print_config`` does and compares it, key by key, with ``data/recipes_resolved/<recipe>.yaml``: the
resolved configs of the self-contained recipes (git 9f952c3), written by :func:`write_fixtures`.

A deliberate change to a recipe, or a new constructor argument with a default, changes the resolved
config: check the difference, then rewrite the fixtures with

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.experiments.test_recipes_resolved
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = ROOT / "experiments" / "recipes"
FIXTURES = Path(__file__).resolve().parent / "data" / "recipes_resolved"


def recipes() -> list[Path]:
    """Runnable recipes: ``recipes/*.yaml`` and ``recipes/moco/*.yaml`` (the parts live in ``metrix/``, ``mlrc/``)."""
    return sorted(RECIPE_DIR.glob("*.yaml")) + sorted((RECIPE_DIR / "moco").glob("*.yaml"))


def fixture_name(recipe: Path) -> str:
    return ".".join(recipe.relative_to(RECIPE_DIR).with_suffix("").parts) + ".yaml"


def resolved(recipe: Path) -> str:
    """The YAML that ``hardneg fit --config RECIPE --print_config`` prints (no class is instantiated)."""
    from experiments.lightning_cli import run_lightning_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        with pytest.raises(SystemExit) as exit_:
            run_lightning_cli(["fit", "--config", str(recipe), "--print_config"])
    assert not exit_.value.code, f"{recipe}: --print_config exited with {exit_.value.code}"
    return out.getvalue()


def write_fixtures() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for recipe in recipes():
        (FIXTURES / fixture_name(recipe)).write_text(resolved(recipe))


def flatten(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    if isinstance(node, list) and any(isinstance(item, (dict, list)) for item in node):
        return {k: v for i, item in enumerate(node) for k, v in flatten(item, f"{prefix}[{i}]").items()}
    return {prefix: node}


def test_every_recipe_has_a_fixture():
    assert sorted(fixture_name(r) for r in recipes()) == sorted(p.name for p in FIXTURES.glob("*.yaml"))


@pytest.mark.parametrize("recipe", recipes(), ids=fixture_name)
def test_recipe_resolves_unchanged(recipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = flatten(yaml.safe_load((FIXTURES / fixture_name(recipe)).read_text()))
    got = flatten(yaml.safe_load(resolved(recipe)))
    diff = {k: (expected.get(k, "<absent>"), got.get(k, "<absent>")) for k in expected.keys() | got.keys() if expected.get(k, "<absent>") != got.get(k, "<absent>")}
    assert not diff, f"{recipe.name} resolves differently (key: (before, now)): {diff}"


if __name__ == "__main__":
    write_fixtures()

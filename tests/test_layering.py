"""The layering of DESIGN.md: the contracts sit below miners and losses, and neither of those imports the other.

``contracts/`` (distances, ``Mined``/``MixSpec``, input checks, relevance masks, the cross-rank
gather) imports no other package of the project; ``miners/`` and ``losses/`` import ``contracts/``
and themselves only. Every import counts, also one inside a function.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"contracts", "miners", "losses", "lightning_modules", "experiments", "datamodules", "models"}

#: the project packages each layer may import (itself included); None = not restricted here.
ALLOWED = {
    "contracts": {"contracts"},
    "miners": {"contracts", "miners"},
    "losses": {"contracts", "losses"},
}


def imported_packages(path: Path, package: str) -> dict[str, list[str]]:
    """The project packages ``path`` imports, each with the import statements that name it (``file:line``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: dict[str, list[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [package] if node.level else [node.module or ""]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in PROJECT_PACKAGES:
                found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_lies_below(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    wrong = [
        where
        for path in files
        for top, places in imported_packages(path, package).items()
        if top not in ALLOWED[package]
        for where in places
    ]
    assert not wrong, f"{package}/ may import only {sorted(ALLOWED[package])} of the project:\n" + "\n".join(wrong)


def test_importing_a_contract_loads_no_miner_and_no_loss():
    code = "import contracts.distances, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in ('miners', 'losses')))"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"import contracts.distances loaded {out.stdout.strip()}"


def test_the_documented_import_paths_still_work():
    from contracts import CosineSimilarity as contract_cosine, Mined as contract_mined
    from losses import CosineSimilarity, LpDistance, Metrix  # noqa: F401
    from miners import Mined

    assert CosineSimilarity is contract_cosine and Mined is contract_mined

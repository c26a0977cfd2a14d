"""``hardneg data check``: check a benchmark folder and print its split sizes, before any training.

    hardneg data check --data experiments/recipes/metrix_contrastive_cub.yaml \\
        --data.init_args.root=/datasets/CUB_200_2011 [--verify]

``--data`` takes a full run config (its ``data:`` section is used) or a data-only fragment
(``class_path``/``init_args``, with or without a top-level ``data:`` key). Further
``--data.init_args.KEY=VALUE`` arguments override it, as with ``hardneg fit``. The DataModule is
built with jsonargparse and ``setup()`` runs every check of its folder (missing root or metadata
file, unparsable line, listed image absent, class counts); ``--verify`` also decodes every image.
Exit status 0 when the folder is sound, 1 with the DataModule's message when it is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

USAGE = "hardneg data check --data CONFIG.yaml [--data.init_args.KEY=VALUE ...] [--verify]"


def load_data_spec(path: Path) -> dict[str, Any]:
    """The DataModule spec (``{class_path, init_args}``) of a run config or a data fragment."""
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"config {path} is not a YAML mapping")
    spec = config.get("data", config)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"config {path} has no DataModule: expected a 'data:' section with class_path/init_args "
            f"(a run config) or class_path/init_args at the top (a data fragment)"
        )
    return spec


def build_datamodule(spec: dict[str, Any], overrides: list[str]):
    """Instantiate the spec with jsonargparse (type-checked like LightningCLI), applying ``--data.*`` overrides."""
    from jsonargparse import ArgumentParser

    from datamodules import MetricLearningDataModule

    parser = ArgumentParser(prog="hardneg data check", exit_on_error=False)
    parser.add_subclass_arguments(MetricLearningDataModule, "data", required=True)
    cfg = parser.parse_args(["--data", json.dumps(spec), *overrides])
    return parser.instantiate_classes(cfg).data


def format_report(datamodule) -> str:
    sizes = datamodule.split_sizes()
    lines = [f"{'split':<10}{'images':>10}{'classes':>10}"]
    lines += [f"{name:<10}{row['images']:>10,}{row['classes']:>10,}" for name, row in sizes.items()]
    protocol = {"self": "every test image a query against the others", "query_gallery": "query set against gallery"}
    lines.append(f"protocol: {protocol.get(datamodule.eval_protocol, datamodule.eval_protocol)}")
    lines.append(f"recall@K: {', '.join(str(k) for k in datamodule.recall_ks)}")
    return "\n".join(lines)


def check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hardneg data check", usage=USAGE, description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, metavar="CONFIG.yaml", help="run config or data fragment")
    parser.add_argument("--verify", action="store_true", help="also decode every image (minutes on the real benchmarks)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--data.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides must start with --data.)")
    from jsonargparse import ArgumentError

    from datamodules import DatasetFormatError

    try:
        datamodule = build_datamodule(load_data_spec(Path(args.data)), overrides)
        if args.verify:
            datamodule.verify = True
        datamodule.setup("fit")
    except (DatasetFormatError, OSError, ValueError, TypeError, ArgumentError) as err:
        print(f"hardneg data check: FAILED: {err}", file=sys.stderr)
        return 1
    print(f"{type(datamodule).__module__}.{type(datamodule).__name__}  root={getattr(datamodule, 'root', '-')}")
    print(format_report(datamodule))
    print(f"OK: metadata parsed, every listed image present{', every image decoded' if args.verify else ''}")
    return 0


def main(argv: list[str]) -> int:
    """``hardneg data ACTION``; the only action is ``check``."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}\n\n{__doc__}")
        return 0
    if argv[0] != "check":
        print(f"hardneg data: unknown action {argv[0]!r}; usage: {USAGE}", file=sys.stderr)
        return 2
    return check(argv[1:])

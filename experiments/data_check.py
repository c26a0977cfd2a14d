"""``hardneg data check``: check a DataModule's data and print its split sizes, before any training.

    hardneg data check --data experiments/recipes/metrix_contrastive_cub.yaml \\
        --data.init_args.root=/datasets/CUB_200_2011 [--verify]

``--data`` takes a full run config (its ``data:`` section is used) or a data-only fragment
(``class_path``/``init_args``, with or without a top-level ``data:`` key). Further
``--data.init_args.KEY=VALUE`` arguments override it, as with ``hardneg fit``. The DataModule is
built with jsonargparse (any ``LightningDataModule``: the benchmark folders, Fashion-MNIST, digits,
a text DataModule, the two-view wrapper) and its splits are built: ``prepare_splits()`` of a
``datamodules.RetrievalDataModule`` runs every check of its data (missing root or metadata file,
unparsable line, listed image absent, class counts) without needing the encoder (a text
DataModule's tokenizer comes from it); another DataModule runs ``setup("fit")``. ``--verify`` also
loads every item (decodes every image).
Then it runs the pre-flight checks of ``hardneg fit`` (``experiments.preflight``): P x K against the
size of every train class and, for a run config, its model against the data (``num_classes``,
``embedding_size``, miner/loss/memory compatibility). The model's components are built from the
config; the encoder is not (its ``embed_dim`` comes from the preset registry or its arguments).
Exit status 0 when the folder is sound, 1 with the DataModule's message when it is not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

USAGE = "hardneg data check --data CONFIG.yaml [--data.init_args.KEY=VALUE ...] [--verify]"


def load_data_spec(path: Path) -> dict[str, Any]:
    """The DataModule spec (``{class_path, init_args}``) of a run config or a data fragment."""
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    from experiments.lightning_cli import load_config  # a recipe's parts: composed (imports lightning)

    config = load_config(path)
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
    from lightning import LightningDataModule

    parser = ArgumentParser(prog="hardneg data check", exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    cfg = parser.parse_args(["--data", json.dumps(spec), *overrides])
    return parser.instantiate_classes(cfg).data


def load_run_config(path: Path) -> dict[str, Any]:
    from experiments.lightning_cli import load_config  # a recipe's parts: composed (imports lightning)

    config = load_config(path)
    return config if isinstance(config, dict) and "data" in config else {}


def encoder_embed_dim(spec: Any) -> int | None:
    """The encoder's output size from its config, without building it; ``None`` when the config does not say."""
    import importlib
    import inspect

    if not isinstance(spec, dict) or "class_path" not in spec:
        return None
    init_args = spec.get("init_args") or {}
    if spec["class_path"] in ("models.preset", "models.registry.preset"):
        from models import get_preset_info

        overrides = init_args.get("overrides") or {}
        if "embed_dim" in overrides:
            return overrides["embed_dim"] if isinstance(overrides["embed_dim"], int) and overrides["embed_dim"] > 0 else None
        return get_preset_info(init_args["name"]).embed_dim
    if isinstance(init_args.get("embed_dim"), int):
        return init_args["embed_dim"] or None
    module, _, name = spec["class_path"].rpartition(".")
    try:
        default = inspect.signature(getattr(importlib.import_module(module), name)).parameters["embed_dim"].default
    except (ImportError, AttributeError, KeyError, ValueError, TypeError):
        return None
    return default if isinstance(default, int) and default > 0 else None


def build_component(spec: Any):
    """One model component (loss, miner, mixer ...) from its ``class_path``/``init_args``, as LightningCLI builds it."""
    from typing import Optional

    from jsonargparse import ArgumentParser
    from torch import nn

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--component", type=Optional[nn.Module])
    return parser.instantiate_classes(parser.parse_args(["--component", json.dumps(spec)])).component


def model_components(config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """``({option: component}, encoder embed_dim)`` of a run config's model: the ``nn.Module`` arguments
    other than the encoder, built; nothing for a data fragment."""
    import importlib

    from torch import nn

    init_args = ((config.get("model") or {}).get("init_args")) or {}
    components: dict[str, Any] = {}
    for key, spec in init_args.items():
        if key == "encoder" or not isinstance(spec, dict) or "class_path" not in spec:
            continue
        module, _, name = spec["class_path"].rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError):
            continue
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            components[f"model.init_args.{key}"] = build_component(spec)
    return components, encoder_embed_dim(init_args.get("encoder"))


def world_size(config: dict[str, Any]) -> int:
    trainer = config.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    return (devices if isinstance(devices, int) and devices > 0 else 1) * (nodes if isinstance(nodes, int) else 1)


def describe(datamodule) -> str:
    """``module.Class  root=...`` of a DataModule, and of the one a wrapper (``TwoViewDataModule``) wraps."""
    text = f"{type(datamodule).__module__}.{type(datamodule).__name__}"
    inner = getattr(datamodule, "datamodule", None)
    if inner is not None:
        return f"{text} wrapping {describe(inner)}"
    return f"{text}  root={getattr(datamodule, 'root', '-')}"


def format_report(datamodule) -> str:
    """Split sizes (items or images, classes) and, when the DataModule declares them, its evaluation protocol
    and Recall@K; a DataModule without ``split_sizes`` gets its datasets' lengths."""
    sizes = datamodule.split_sizes() if callable(getattr(datamodule, "split_sizes", None)) else dataset_sizes(datamodule)
    if not sizes:
        return "(the DataModule exposes no datasets)"
    noun = next(k for k in next(iter(sizes.values())) if k != "classes")
    lines = [f"{'split':<10}{noun:>10}{'classes':>10}"]
    lines += [f"{name:<10}{row[noun]:>10,}{row['classes']:>10,}" if row.get("classes") is not None else f"{name:<10}{row[noun]:>10,}{'-':>10}"
              for name, row in sizes.items()]
    for name, row in sizes.items():  # the counts a DataModule adds (query/document: positives per query ...)
        extra = {k: v for k, v in row.items() if k not in (noun, "classes") and v is not None}
        if extra:
            lines.append(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v:,.2f}" if isinstance(v, float) else f"{k.replace('_', ' ')} {v:,}" for k, v in extra.items()))
    protocol = {
        "self": "every test item a query against the others",
        "query_gallery": "query set against gallery",
        "query_doc": "each split's queries against the whole corpus (qrels)",
        "image_text": "images against captions, both directions (several captions per image)",
    }
    eval_protocol = getattr(datamodule, "eval_protocol", None)
    if eval_protocol is not None:
        lines.append(f"protocol: {protocol.get(eval_protocol, eval_protocol)}")
    if getattr(datamodule, "recall_ks", None):
        lines.append(f"recall@K: {', '.join(str(k) for k in datamodule.recall_ks)}")
    summary = getattr(datamodule, "data_summary", None)
    if callable(summary):  # image-text: captions per image, negatives, skipped samples
        lines.append(summary())
    return "\n".join(lines)


def dataset_sizes(datamodule) -> dict[str, dict[str, Any]]:
    """``{split: {"items", "classes"}}`` from ``train_dataset``/``val_dataset``/``test_dataset`` attributes."""
    import numpy as np

    out = {}
    for name in ("train", "val", "test"):
        ds = getattr(datamodule, f"{name}_dataset", None)
        if ds is None:
            continue
        labels = getattr(ds, "labels", None)
        out[name] = {"items": len(ds), "classes": int(len(np.unique(labels))) if labels is not None else None}
    return out


def build_splits(datamodule) -> None:
    """Every check of the data that needs no model: ``prepare_splits()`` when the DataModule has it, else ``setup``."""
    prepare = getattr(datamodule, "prepare_splits", None)
    if callable(prepare):
        prepare()
    else:
        datamodule.setup("fit")


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
    from experiments.preflight import check_run, run_facts

    try:
        datamodule = build_datamodule(load_data_spec(Path(args.data)), overrides)
        if args.verify:
            for dm in (datamodule, getattr(datamodule, "datamodule", None)):
                if dm is not None and hasattr(dm, "verify"):
                    dm.verify = True
        build_splits(datamodule)
        run_config = load_run_config(Path(args.data))
        components, embed_dim = model_components(run_config)
        # The same checks as hardneg fit's (HardnegCLI.before_fit), on the same DataModule.
        problems = check_run(components, run_facts(datamodule, embed_dim, world_size(run_config)))
    except (DatasetFormatError, OSError, ValueError, TypeError, ArgumentError) as err:
        print(f"hardneg data check: FAILED: {err}", file=sys.stderr)
        return 1
    if problems:
        lines = [f"hardneg data check: FAILED: hardneg fit would stop at {len(problems)} problem(s) before training:"]
        print("\n".join(lines + [f"  - {p}" for p in problems]), file=sys.stderr)
        return 1
    print(describe(datamodule))
    print(format_report(datamodule))
    print(f"OK: splits built, every check of the data passed{', every item loaded' if args.verify else ''}")
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

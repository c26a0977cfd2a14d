"""Help that fits a screen: ``hardneg fit --model.help MetricLearningModule`` and friends.

jsonargparse resolves a short class name (``MetricLearningModule``, ``BatchHardMiner``) only among
the subclasses already imported, so :func:`import_components` imports the project's components
before the parser is built. For an argument typed ``nn.Module`` it lists every known subclass (all
of ``torch.nn`` and ``torchmetrics``: 2,800 lines for ``MetricLearningModule``);
:class:`HardnegHelpFormatter` keeps the project's own classes in that list.
"""

from __future__ import annotations

import importlib
import re

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

PROJECT_PACKAGES = ("lightning_modules", "datamodules", "models", "miners", "losses", "experiments")
COMPONENT_MODULES = (
    "lightning_modules.metric_learning_module", "lightning_modules.moco_module", "datamodules",
    "datamodules.two_view_datamodule", "models", "miners", "losses",
)
_KNOWN = re.compile(r", known subclasses: ([^)]*)")


def import_components() -> None:
    """Import the LightningModules, DataModules, encoders, miners and losses (short names resolve)."""
    for name in COMPONENT_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra missing: its classes then need their full path
            pass


def project_classes(listed: str) -> str:
    keep = [p.strip() for p in listed.split(",") if p.strip().split(".")[0] in PROJECT_PACKAGES]
    return ", known subclasses: " + ", ".join(keep) if keep else ""


class HardnegHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, with "known subclasses" limited to the project's classes."""

    def _get_help_string(self, action) -> str:
        return _KNOWN.sub(lambda m: project_classes(m.group(1)), super()._get_help_string(action))


class HardnegArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` with :class:`HardnegHelpFormatter`; the per-class help parsers
    jsonargparse builds (``type(parser)(...)``) inherit it."""

    def __init__(self, *args, formatter_class=HardnegHelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _help_target(argv: list[str], option: str = "--model.help") -> str | None:
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(option + "="):
            return arg.split("=", 1)[1]
    return None


def project_class(name: str, base: type) -> type | None:
    """The imported project subclass of ``base`` named ``name`` (short name or full class path)."""
    found, stack = [], [base]
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        path = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__module__.split(".")[0] in PROJECT_PACKAGES and name in (cls.__name__, path):
            found.append(cls)
    return found[0] if len(set(found)) == 1 else None


def print_component_help(argv: list[str]) -> bool:
    """``--model.help BatchHardMiner``: a miner, loss or encoder is not a LightningModule, so jsonargparse
    refuses it; print that component's options (and where it goes) instead. True when printed."""
    import lightning as L
    from torch import nn

    name = _help_target(argv)
    if not name:
        return False
    cls = project_class(name, nn.Module)
    if cls is None or issubclass(cls, L.LightningModule):
        return False
    parser = HardnegArgumentParser(
        prog=f"hardneg fit --model.init_args.ARG={cls.__name__}",
        description=(
            f"{cls.__module__}.{cls.__name__} is a component of the model, not a LightningModule: give it as an "
            f"argument of the model (e.g. --model.init_args.miner={cls.__name__} or loss/encoder/mixer) and set its "
            f"options as --model.init_args.ARG.init_args.OPTION=VALUE. Its options:"
        ),
    )
    parser.add_class_arguments(cls)
    parser.print_help()
    return True

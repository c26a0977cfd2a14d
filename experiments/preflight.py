"""Pre-flight: everything the configuration alone decides is checked before any image is loaded.

``hardneg fit`` runs :func:`check_run` from ``HardnegCLI.before_fit`` (after the classes are built,
before the Trainer sets up the data or a callback evaluates the untrained encoder), and
``hardneg data check`` runs the same function on the same pieces, so a folder the data check
approves is one that ``fit`` accepts. Each problem names the option as the user writes it
(``model.init_args.loss``, ``data.init_args.samples_per_class``) and what would be right.

The checks read what the components declare about themselves, never their class names:

- a loss: ``supports_ref_emb`` (False: cannot take a reference set or memory) and ``accepts_mix``
  (True: uses the synthetic points of ``Mined.mix``), see ``losses.base_loss.BaseLoss``;
- a miner or mixer: ``produces_mix`` (True: hands the loss synthetic points, e.g. ``MoCHiMiner``,
  ``Metrix``);
- a wrapper that feeds its ``loss`` a reference set: ``supplies_ref_emb`` (``CrossBatchMemory``);
- any component: an ``embedding_size`` must equal the encoder's ``embed_dim``, a ``num_classes``
  must cover the train labels, a ``memory_size`` must hold the global batch;
- any component may define ``check_compatibility(facts: RunFacts) -> iterable of (argument,
  message)`` for a requirement of its own (``argument`` relative to the component, ``""`` for the
  component itself); it is called with what is known of the run.

Components are found by walking the model's children; an attribute is the constructor argument of
the same name (``self.loss = loss``), which is how a child's option path is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

# Children a component hands its output to, and those that produce it (by constructor argument name).
CONSUMER = "loss"
PRODUCERS = ("miner", "mixer")
# Children not walked into: an encoder's own modules (timm's ``num_classes`` ...) are not components
# (the text regime's towers, guide and teacher, the CLIP regime's model).
OPAQUE = ("encoder", "backbone", "distance", "query_encoder", "doc_encoder", "model", "guide", "teacher")


@dataclass(frozen=True)
class Problem:
    """One incompatibility: the option to change (as written in a config or on the command line) and why."""

    option: str
    message: str

    def __str__(self) -> str:
        return f"{self.option}: {self.message}"


@dataclass
class RunFacts:
    """What is known of the run when it is built; ``None`` where it is not known (then not checked).

    Args:
        embed_dim: the encoder's output size ``D``.
        encoder_option: where the encoder is configured (for messages).
        train_labels: the 0-based label of every training item.
        class_name: how the dataset names the class of a label (``"002.Laysan_Albatross"``).
        data_name: the DataModule's class name (for messages).
        classes_per_batch, samples_per_class, repeat_small_classes: the P x K sampler settings
            (``None``: the train batches have no declared P x K, e.g. an injected cluster sampler).
        sampler_option: where those settings are configured (for messages).
        world_size: processes that each draw P classes per step.
    """

    embed_dim: int | None = None
    encoder_option: str = "model.init_args.encoder"
    train_labels: np.ndarray | None = None
    class_name: Any = field(default=lambda label: f"label {label}")
    data_name: str = "the DataModule"
    classes_per_batch: int | None = None
    samples_per_class: int | None = None
    repeat_small_classes: bool = False
    sampler_option: str = "data.init_args"
    world_size: int = 1

    @property
    def global_batch(self) -> int | None:
        if self.classes_per_batch is None or self.samples_per_class is None:
            return None
        return self.classes_per_batch * self.samples_per_class * self.world_size


class PreflightError(ValueError):
    """The configuration cannot train; ``problems`` lists why."""

    def __init__(self, problems: list[Problem], command: str = "hardneg fit") -> None:
        self.problems = problems
        self.command = command
        super().__init__(format_problems(problems, command))


def format_problems(problems: list[Problem], command: str = "hardneg fit") -> str:
    lines = [f"{command}: the configuration cannot train ({len(problems)} problem{'s' * (len(problems) != 1)}; nothing was run):"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- entry points
def run_facts(datamodule: Any = None, embed_dim: int | None = None, world_size: int = 1) -> RunFacts:
    """Facts of a run: the encoder's ``embed_dim`` and, for a DataModule with ``prepare_splits``
    (``datamodules.MetricLearningDataModule``), its train labels and P x K settings. Reads the
    metadata only (images are decoded only when the DataModule has ``verify=True``)."""
    facts = RunFacts(embed_dim=embed_dim, world_size=max(1, int(world_size or 1)))
    if datamodule is None or not callable(getattr(datamodule, "prepare_splits", None)):
        return facts
    datamodule.prepare_splits()
    facts.data_name = type(datamodule).__name__
    labels = getattr(datamodule.train_dataset, "labels", None)
    # query/document and image-text items carry row ids, not classes: no class-count checks
    classes = getattr(datamodule, "eval_protocol", "self") not in ("query_doc", "image_text")
    facts.train_labels = np.asarray(labels) if labels is not None and classes else None
    namer = getattr(datamodule, "class_name", None)
    if callable(namer):
        facts.class_name = namer
    pk = datamodule.pk_settings() if callable(getattr(datamodule, "pk_settings", None)) else {
        key: getattr(datamodule, key, None) for key in ("classes_per_batch", "samples_per_class", "repeat_small_classes")}
    if pk is not None:
        facts.classes_per_batch = pk.get("classes_per_batch")
        facts.samples_per_class = pk.get("samples_per_class")
        facts.repeat_small_classes = bool(pk.get("repeat_small_classes", False))
        if getattr(datamodule, "batch_sampler", None) is not None:  # P x K given to an injected ClassBalancedBatchSampler
            facts.sampler_option = "data.init_args.batch_sampler.init_args"
    return facts


def check_run(components: dict[str, nn.Module | None], facts: RunFacts) -> list[Problem]:
    """Every problem of ``components`` (option path -> built component, e.g. ``{"model.init_args.loss": loss}``)
    and of the data described by ``facts``."""
    problems = check_data(facts)
    for option, component in components.items():
        if component is not None:
            problems += check_component(component, option, facts)
    problems += check_feeding(components, "model.init_args")
    return _unique(problems)


def check_model(model: nn.Module, datamodule: Any = None, world_size: int = 1) -> list[Problem]:
    """``check_run`` for a built LightningModule (its children are the components) and DataModule."""
    children = dict(model.named_children())
    step = children.pop("step", None)
    if step is not None:  # the shared training step holds the configured loss, miner and mixer
        children.update(step.named_children())
    components = {f"model.init_args.{name}": child for name, child in children.items() if name not in OPAQUE}
    encoder = getattr(model, "encoder", None)
    embed_dim = getattr(encoder, "embed_dim", None)
    return check_run(components, run_facts(datamodule, embed_dim if isinstance(embed_dim, int) else None, world_size))


# ---------------------------------------------------------------------------------------- the data
def check_data(facts: RunFacts) -> list[Problem]:
    """P x K against the train split: enough classes for a global batch, K images in every class."""
    if facts.train_labels is None or facts.classes_per_batch is None or facts.samples_per_class is None:
        return []
    classes, counts = np.unique(facts.train_labels, return_counts=True)
    P, K, world = facts.classes_per_batch, facts.samples_per_class, facts.world_size
    problems = []
    if P * world > len(classes):
        ranks = f" x {world} processes" if world > 1 else ""
        problems.append(Problem(
            f"{facts.sampler_option}.classes_per_batch",
            f"a batch draws {P * world} distinct classes (classes_per_batch={P}{ranks}) but the train split of "
            f"{facts.data_name} has {len(classes)}; set classes_per_batch <= {len(classes) // world}",
        ))
    small = np.flatnonzero(counts < K)
    if len(small) and not facts.repeat_small_classes:
        shown = ", ".join(f"{facts.class_name(int(classes[i]))} ({counts[i]} images)" for i in small[:5])
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        problems.append(Problem(
            f"{facts.sampler_option}.samples_per_class",
            f"samples_per_class={K} images per class in a batch, but {len(small)} train classes of {facts.data_name} "
            f"have fewer: {shown}{more}; set samples_per_class <= {int(counts.min())}, or "
            f"{facts.sampler_option}.repeat_small_classes: true to repeat their images",
        ))
    return problems


# ---------------------------------------------------------------------------------- the components
def walk(component: nn.Module, option: str) -> Iterator[tuple[str, nn.Module]]:
    """``(option path, module)`` for ``component`` and every sub-component set from a constructor argument."""
    yield option, component
    for name, child in component.named_children():
        if name not in OPAQUE:
            yield from walk(child, f"{option}.init_args.{name}")


def check_component(component: nn.Module, option: str, facts: RunFacts) -> list[Problem]:
    problems = []
    for path, module in walk(component, option):
        problems += _declared_sizes(module, path, facts)
        problems += check_feeding(dict(module.named_children()), path + ".init_args", owner=module, owner_option=path)
        hook = getattr(module, "check_compatibility", None)
        if callable(hook):
            for argument, message in hook(facts) or ():
                problems.append(Problem(f"{path}.init_args.{argument}" if argument else path, message))
    return problems


def _declared_sizes(module: nn.Module, option: str, facts: RunFacts) -> list[Problem]:
    name, problems = type(module).__name__, []
    size = getattr(module, "embedding_size", None)
    if isinstance(size, int) and facts.embed_dim is not None and size != facts.embed_dim:
        problems.append(Problem(
            f"{option}.init_args.embedding_size",
            f"{name} has embedding_size={size} but the encoder ({facts.encoder_option}) outputs "
            f"{facts.embed_dim}-d embeddings; set embedding_size: {facts.embed_dim}",
        ))
    num_classes = getattr(module, "num_classes", None)
    if isinstance(num_classes, int) and facts.train_labels is not None and len(facts.train_labels):
        needed = int(facts.train_labels.max()) + 1
        if num_classes < needed:
            distinct = len(np.unique(facts.train_labels))
            problems.append(Problem(
                f"{option}.init_args.num_classes",
                f"{name} has num_classes={num_classes} but the train split of {facts.data_name} has labels "
                f"{int(facts.train_labels.min())}..{needed - 1} ({distinct} classes); set num_classes: {needed}",
            ))
    memory = getattr(module, "memory_size", None)
    if isinstance(memory, int) and facts.global_batch is not None and memory < facts.global_batch:
        problems.append(Problem(
            f"{option}.init_args.memory_size",
            f"{name} has memory_size={memory} but every step enqueues the global batch of {facts.global_batch} "
            f"(classes_per_batch x samples_per_class x processes); set memory_size >= {facts.global_batch}",
        ))
    return problems


def check_feeding(
    children: dict[str, nn.Module | None],
    prefix: str,
    owner: nn.Module | None = None,
    owner_option: str | None = None,
) -> list[Problem]:
    """The ``loss`` among ``children`` (keys: argument names or option paths ending in one) against
    what feeds it: synthetic points from a ``produces_mix`` miner/mixer, a reference set from the
    ``owner`` when it ``supplies_ref_emb``."""
    by_name = {key.rsplit(".", 1)[-1]: (key if "." in key else f"{prefix}.{key}", child) for key, child in children.items()}
    if CONSUMER not in by_name or by_name[CONSUMER][1] is None:
        return []
    loss_option, loss = by_name[CONSUMER]
    problems = []
    for role in PRODUCERS:
        option, producer = by_name.get(role, (None, None))
        if producer is None or not getattr(producer, "produces_mix", False) or getattr(loss, "accepts_mix", False):
            continue
        hint = ""
        if getattr(loss, "supplies_ref_emb", False) and hasattr(loss, "miner") and role == "miner":
            hint = f"; to mix against the memory, give the miner to it: {loss_option}.init_args.miner"
        problems.append(Problem(
            loss_option,
            f"{type(loss).__name__} does not use the synthetic negatives that {option} ({type(producer).__name__}) "
            f"makes (Mined.mix); choose a loss that accepts them: {', '.join(_losses_with('accepts_mix', True))}{hint}",
        ))
    if owner is not None and getattr(owner, "supplies_ref_emb", False) and getattr(loss, "supports_ref_emb", True) is False:
        problems.append(Problem(
            loss_option,
            f"{type(loss).__name__} cannot compare with a reference set, but {owner_option} ({type(owner).__name__}) "
            f"gives its loss one (the memory); use {type(loss).__name__} without {type(owner).__name__}, or a loss that "
            f"supports it: {', '.join(_losses_with('supports_ref_emb', True))}",
        ))
    return problems


def _losses_with(attribute: str, value: bool) -> list[str]:
    """The registered losses (``losses.BaseLoss`` subclasses imported so far) that declare ``attribute = value``."""
    from losses.base_loss import BaseLoss

    found, stack = [], list(BaseLoss.__subclasses__())
    while stack:
        cls = stack.pop()
        stack += cls.__subclasses__()
        if getattr(cls, attribute, None) is value and not cls.__name__.startswith("_") and "<locals>" not in cls.__qualname__:
            found.append(cls.__name__)
    return sorted(set(found))


def _unique(problems: Iterable[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def exit_if_cannot_train(model: nn.Module, datamodule: Any, world_size: int = 1, command: str = "hardneg fit") -> None:
    """``SystemExit`` with every problem (or the DataModule's own message when its folder is unsound);
    nothing when the run can start. Called by ``HardnegCLI.before_fit``."""
    from datamodules.metadata import DatasetFormatError

    try:
        problems = check_model(model, datamodule, world_size)
    except (DatasetFormatError, OSError, ValueError) as err:
        raise SystemExit(f"{command}: {err}") from None
    if problems:
        raise SystemExit(format_problems(problems, command))

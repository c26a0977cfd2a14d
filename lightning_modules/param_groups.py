"""Optimizer parameter groups that exempt biases, normalisation gains and scalars from weight decay.

Weight decay (``AdamW``'s decoupled decay, or the L2 term of SGD) shrinks every tensor it is given
towards zero. For a weight matrix that is the intended regulariser; for the other tensors of a
network it is not: a bias or a LayerNorm/BatchNorm shift has no scale to regularise, a norm gain
decayed to zero switches its channel off, and CLIP's learned ``logit_scale`` (and SigLIP's
``logit_bias``) is a temperature, which decay would drag towards ``exp(0) = 1``. The reference
training loops therefore give these tensors ``weight_decay = 0``:

- open_clip's training (``open_clip_train/main.py``, the AdamW branch): a parameter is exempt when
  ``p.ndim < 2`` or its name contains "bn", "ln", "bias" or "logit_scale".
- transformers' ``Trainer`` (``Trainer.get_decay_parameter_names``): the parameters of LayerNorm
  layers and those named like a bias or a norm; sentence-transformers' ``fit`` and the ANCE/STAR/ADORE
  scripts: names containing "bias" or "LayerNorm.weight".
- timm (``timm.optim.param_groups_weight_decay``, used by ``create_optimizer_v2``): ``p.ndim <= 1``,
  names ending in ".bias", and the names a model lists in its ``no_weight_decay()`` method (ViT
  position embeddings and class token; open_clip's ``CLIP.no_weight_decay`` lists its position
  embeddings too).

The first two are name heuristics for one structural fact: in these models every bias, norm gain
and norm shift is a 1-D tensor and every scalar is 0-D. This module states that fact as the rule,
``ndim < 2`` (plus a ".bias" name, as timm, for an odd 2-D bias), so it needs no list of layer
names and gives, on a CLIP, a BERT or a CNN, the same partition as open_clip's training and the
Trainer (``tests/lightning_modules/test_param_groups.py`` compares them). The rules
(``EmbeddingModule(no_weight_decay=...)``):

- ``None``: no exemption; one group, every tensor decayed (what ``torch.optim`` does with
  ``model.parameters()``).
- ``"norm_bias"``: tensors with ``ndim < 2`` and names ending in ".bias" get no decay: the
  partition of open_clip's training, the transformers ``Trainer`` and sentence-transformers.
- ``"norm_bias+model"``: also the names the modules' own ``no_weight_decay()`` return (position
  embeddings, class/register tokens): timm's ``create_optimizer_v2`` partition. open_clip's own AdamW
  path does decay the position embeddings, so the CLIP recipes use ``"norm_bias"``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable
from typing import Any

from torch import nn

NO_WEIGHT_DECAY_RULES = ("norm_bias", "norm_bias+model")


def check_no_weight_decay_rule(rule: str | None) -> str | None:
    """``rule`` if it is ``None`` or one of ``NO_WEIGHT_DECAY_RULES``; else a ``ValueError`` naming both."""
    if rule is not None and rule not in NO_WEIGHT_DECAY_RULES:
        raise ValueError(f"no_weight_decay={rule!r} is not a rule; expected None (every parameter decayed) or one of {NO_WEIGHT_DECAY_RULES}")
    return rule


def is_gain_or_bias(name: str, param: nn.Parameter) -> bool:
    """A tensor weight decay should leave alone: a bias, a norm gain or shift, a scalar (``ndim < 2``, or named ``*.bias``)."""
    return param.ndim < 2 or name == "bias" or name.endswith(".bias")


def model_no_weight_decay(module: nn.Module) -> set[str]:
    """The full names (``fnmatch`` patterns, as timm's) that ``module`` and its submodules list in their
    ``no_weight_decay()`` methods, each prefixed with the submodule's path."""
    names: set[str] = set()
    for path, sub in module.named_modules():
        method = getattr(type(sub), "no_weight_decay", None)
        if not callable(method):
            continue
        prefix = f"{path}." if path else ""
        names.update(prefix + name for name in sub.no_weight_decay())
    return names


def weight_decay_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], exclude: Collection[str] = (), **options: Any
) -> list[dict[str, Any]]:
    """Split ``named_params`` into a decayed and a non-decayed optimizer group.

    Args:
        named_params: ``(name, parameter)`` pairs (``module.named_parameters()``); parameters that do
            not require grad are left out, and a parameter listed twice (shared between towers) is
            kept once, under its first name.
        exclude: names or ``fnmatch`` patterns that get no decay whatever their shape
            (``model_no_weight_decay(module)``).
        **options: further settings of both groups (``lr`` of a loss's own parameters).

    Returns:
        ``[{"params": decayed, **options}, {"params": exempt, "weight_decay": 0.0, **options}]``
        without the empty ones. The decayed group has no ``weight_decay`` key, so it takes the
        optimizer's own; the exempt group sets 0 explicitly. ``is_gain_or_bias`` decides exemption.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, param in named_params:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        exempt = is_gain_or_bias(name, param) or any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
        (no_decay if exempt else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, **options})
    if no_decay:
        groups.append({"params": no_decay, **options, "weight_decay": 0.0})
    return groups

"""The open registry of named encoder presets (the zoo), in the manner of timm's ``register_model``.

A preset is a small function that builds an encoder with the settings of one recipe. Its listing
facts (embedding size, weight source, modality) are plain data given to the decorator, so
``list_encoders()`` (and ``hardneg zoo``) reads them without building anything::

    @register_encoder("resnet50-512", embed_dim=512, weights="hub: timm/resnet50.tv_in1k")
    def resnet50_512(**overrides: Any) -> TimmEncoder:
        return TimmEncoder(**{**dict(model_name="resnet50.tv_in1k", embed_dim=512), **overrides})

Registering is enough to get a preset tested: ``tests/models`` loops over the registry and checks
that ``embed_dim`` here matches the built encoder.

Python: ``create_encoder("lite0-128", img_size=64)``. YAML (LightningCLI / jsonargparse), through
``preset`` whose typed signature jsonargparse reads::

    encoder:
      class_path: models.preset
      init_args:
        name: lite0-128
        overrides: {img_size: 64, embed_dim: 64}
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Union

import torch.nn as nn

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class PresetInfo:
    """One registry entry (``get_preset_info``); ``list_encoders`` gives its data fields as dicts."""

    name: str
    embed_dim: int
    weights: str
    builder: Builder = field(repr=False, compare=False)
    modality: str = "image"
    description: str = ""


_PRESETS: Dict[str, PresetInfo] = {}


def register_encoder(
    name: str, *, embed_dim: int, weights: str, modality: str = "image", description: str = ""
) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(**overrides) -> nn.Module`` as the preset ``name``.

    ``embed_dim`` is the output size with default settings, ``weights`` says where the default
    weights come from (``"packaged: ..."``, ``"hub: ..."``, ``"random"``), ``modality`` is
    ``image``, ``text`` or ``image-text``. The function is returned unchanged.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder preset name must be a non-empty string, got {name!r}")
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ValueError(f"preset '{name}': embed_dim must be a positive int, got {embed_dim!r}")

    def decorator(fn: Builder) -> Builder:
        old = _PRESETS.get(name)
        # Re-registering the same function (module reload) is fine; two different ones is a clash.
        if old is not None and _qualname(old.builder) != _qualname(fn):
            raise ValueError(
                f"encoder preset '{name}' is already registered by {_qualname(old.builder)}; "
                f"pick another name for {_qualname(fn)}"
            )
        _PRESETS[name] = PresetInfo(name, embed_dim, weights, fn, modality, description)
        return fn

    return decorator


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def list_encoders() -> List[Dict[str, Any]]:
    """One row per registered preset, sorted by name: ``{name, embed_dim, weights, modality,
    description}``. Cheap: builds nothing."""
    return [
        {"name": p.name, "embed_dim": p.embed_dim, "weights": p.weights, "modality": p.modality,
         "description": p.description}
        for p in (_PRESETS[k] for k in sorted(_PRESETS))
    ]


def get_preset_info(name: str) -> PresetInfo:
    """The registry entry of ``name``; ValueError listing the known names if there is none."""
    try:
        return _PRESETS[name]
    except KeyError:
        known = sorted(_PRESETS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(
            f"unknown encoder preset '{name}'{hint}; known presets: {', '.join(known) or '(none)'}"
        ) from None


def create_encoder(name_or_module: Union[str, nn.Module], **overrides: Any) -> nn.Module:
    """Build the preset ``name_or_module`` with keyword ``overrides``; a module is returned as is.

    Overrides are the builder's keyword arguments (for timm presets: those of ``TimmEncoder``,
    e.g. ``pretrained=False``, ``img_size=64``, ``embed_dim=64``).
    """
    if isinstance(name_or_module, nn.Module):
        if overrides:
            raise ValueError(
                f"overrides {sorted(overrides)} apply to preset names only; got an already built "
                f"{type(name_or_module).__name__}"
            )
        return name_or_module
    if not isinstance(name_or_module, str):
        raise TypeError(
            f"create_encoder expects a preset name (str) or an nn.Module, got "
            f"{type(name_or_module).__name__}"
        )
    return get_preset_info(name_or_module).builder(**overrides)


def preset(name: str, overrides: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The YAML entry point: ``class_path: models.preset`` with ``init_args: {name, overrides}``.

    Same as ``create_encoder(name, **overrides)``; the overrides sit in one typed dict because
    jsonargparse cannot see through a registry lookup to validate free keyword arguments.
    """
    return create_encoder(name, **(overrides or {}))

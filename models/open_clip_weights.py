"""Weights of an open_clip model: pretrained tags resolved before building, local checkpoints, the offline error.

``OpenCLIPEncoder`` loads weights through open_clip's own helpers, never a reimplementation:

- a pretrained tag (``pretrained="openai"``) is checked against open_clip's list for the model (close
  matches suggested) and resolved through open_clip's download helper *before* the model is built
  (:func:`resolve_pretrained`); the OpenAI weights get QuickGELU, as they were trained;
- offline machines: when the weights are neither cached nor reachable, ``PretrainedWeightsUnavailable``
  names the model, the tag, the source, and how to pass a local checkpoint (:func:`offline_message`;
  ``hardneg fit`` prints it without a traceback);
- a local ``checkpoint`` file (:func:`load_checkpoint`): this module's ``model.*`` keys directly,
  anything else (open_clip's keys, ``open_clip_train``'s ``epoch_N.pt``) through
  ``open_clip.load_checkpoint``, with its key conversions and position-embedding resampling.

open_clip is imported inside the functions: ``import models`` stays light.
"""

from __future__ import annotations

import difflib
import os
from typing import Any

from torch import nn

from models.timm_encoder import PretrainedWeightsUnavailable


def resolve_pretrained(name: str, tag: str, cfg: dict[str, Any] | None) -> dict[str, Any]:
    """Check the tag and fetch (or find cached) its weights before building; extra ``create_model`` kwargs."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    tag_cfg = get_pretrained_cfg(name, tag)
    if not tag_cfg:
        if os.path.isfile(tag):
            return {}  # open_clip also takes a file path here
        tags = open_clip.list_pretrained_tags_by_model(name)
        close = difflib.get_close_matches(tag, tags, n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"OpenCLIPEncoder: '{name}' has no pretrained tag {tag!r}{hint}; its tags: {', '.join(tags) or '(none)'}. "
                         "A local weights file goes in checkpoint=")
    try:
        download_pretrained(tag_cfg)
    except Exception as err:
        raise PretrainedWeightsUnavailable(offline_message(name, tag, tag_cfg.get("hf_hub") or tag_cfg.get("url"), err)) from err
    # The OpenAI weights were trained with QuickGELU, which the plain ViT-B-32 config does not use.
    if tag_cfg.get("quick_gelu") and not (cfg or {}).get("quick_gelu", False):
        return {"force_quick_gelu": True}
    return {}


def offline_message(name: str, tag: str | None, source: str | None, err: BaseException) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "this machine is offline (HF_HUB_OFFLINE is set)" if offline else "the hub cannot be reached (offline or no network)"
    what = f"'{name}' with pretrained tag '{tag}'" if tag else f"'{name}'"
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return (f"OpenCLIPEncoder: cannot load the open_clip weights of {what} from {source or 'the hub'}: they are not in the local "
            f"cache and {why} ({type(err).__name__}: {first_line}). Either download them once on a machine with network "
            f"(open_clip.create_model('{name}', pretrained='{tag}'), then copy ~/.cache/huggingface), or pass a local file: "
            f"OpenCLIPEncoder(model_name='{name}', pretrained=None, checkpoint='/path/to/open_clip_pytorch_model.bin') "
            "(a state dict, or an open_clip checkpoint with 'state_dict'); for a preset: encoder init_args overrides "
            "{pretrained: null, checkpoint: /path/to/file}")


def is_download_error(err: BaseException) -> bool:
    root = type(err).__module__.split(".")[0]
    return isinstance(err, OSError) or root in ("huggingface_hub", "httpx", "httpcore", "requests", "urllib3", "urllib")


def load_checkpoint(model: nn.Module, path: str, name: str) -> None:
    """Load a local file into the open_clip model: this module's ``model.*`` keys directly, anything else
    through ``open_clip.load_checkpoint`` (its key conversions and position-embedding resampling)."""
    import open_clip
    from open_clip.factory import load_state_dict

    try:
        state = load_state_dict(path)
    except Exception as err:
        raise ValueError(f"OpenCLIPEncoder checkpoint {path}: cannot read it as a state dict ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict) or not state:
        raise ValueError(f"OpenCLIPEncoder checkpoint {path}: expected a non-empty state dict, got {type(state).__name__}")
    try:
        if all(k.startswith("model.") for k in state):
            model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
        else:
            open_clip.load_checkpoint(model, path, strict=True)
    except RuntimeError as err:
        raise ValueError(f"OpenCLIPEncoder checkpoint {path} does not fit open_clip model '{name}': {str(err)[:800]}") from err

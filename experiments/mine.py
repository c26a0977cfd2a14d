"""``hardneg mine``: mine hard negatives for a query/document DataModule's train queries, offline.

    hardneg mine --model minilm-l6 --data experiments/quickstart/wordnet.yaml --out negatives.jsonl \\
        [--num-negatives 3] [--range-max 30] [--relative-margin 0.05] [--data.init_args.KEY=VALUE ...]

The DataModule (any ``datamodules.QueryDocDataModule``; ``--data`` as for ``hardneg data check``: a
run config or a data fragment) gives the corpus and the train queries with their qrels. The model
(``--model``: a zoo preset, a transformers folder, or a Lightning ``.ckpt`` of a hardneg run, whose
encoders are rebuilt from the run's ``config.yaml``) encodes the corpus once, with a progress bar,
and the train queries chunk by chunk (truncated at the query tower's ``query_max_length`` when it has
one, as in training); ``miners.mine_hard_negatives`` (sentence-transformers'
semantics, every option under the same name) mines each chunk against one faiss index of the corpus.

Output: sentence-transformers' hard-negative JSONL (the format of ``msmarco-hard-negatives.jsonl``,
read by ``datamodules.msmarco_files.read_st_hard_negatives``), one line per train query::

    {"qid": 1185869, "pos": [0], "neg": {"minilm-l6": [8213, 77, 5021]}}

with the DataModule's official query and document ids when it has them (integers when they are
integers, as MS MARCO's), else rows. ``--system`` names the list (default: the model's name).

Resumable. Queries are mined ``--chunk-size`` at a time; each chunk's lines are appended and
flushed to disk, then ``OUT.progress.json`` (written atomically) records the queries done and the
file's length. A rerun with the same settings truncates anything written after the last recorded
chunk (a torn append), reuses the corpus embeddings cached in ``OUT.corpus.npy`` and continues where
it stopped; a rerun with other settings is refused. When every query is done the cache is deleted
and the count of queries left with fewer than ``--num-negatives`` negatives is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

USAGE = (
    "hardneg mine --model PRESET|FOLDER|CKPT --data CONFIG.yaml --out NEGATIVES.jsonl [--num-negatives 3] [--range-min 0] "
    "[--range-max N] [--absolute-margin M] [--relative-margin M] [--max-score S] [--min-score S] [--sampling-strategy top|random] "
    "[--include-positives] [--data.init_args.KEY=VALUE ...]"
)
PROGRESS_SUFFIX = ".progress.json"
CACHE_SUFFIX = ".corpus.npy"
# Settings that change what is written; a rerun must agree on them to resume.
MINING_KEYS = ("num_negatives", "range_min", "range_max", "max_score", "min_score", "absolute_margin", "relative_margin", "sampling_strategy",
               "include_positives", "seed", "index", "chunk_size")  # chunk_size: "random" seeds each chunk


class MineError(Exception):
    """A problem with the arguments, the data or the output file; the message says what to do."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hardneg mine", usage=USAGE, description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="zoo preset (hardneg zoo), transformers model folder, or a hardneg run's .ckpt")
    p.add_argument("--model-config", default=None, help="the run config of a .ckpt (default: config.yaml of its run folder)")
    p.add_argument("--data", required=True, metavar="CONFIG.yaml", help="run config or data fragment of a query/document DataModule")
    p.add_argument("--out", required=True, help="the JSONL file to write (resumed when its .progress.json exists)")
    p.add_argument("--system", default=None, help="name of the negative list in the JSONL (default: the model's name)")
    p.add_argument("--num-negatives", type=int, default=3)
    p.add_argument("--range-min", type=int, default=0)
    p.add_argument("--range-max", type=int, default=None)
    p.add_argument("--max-score", type=float, default=None)
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--absolute-margin", type=float, default=None)
    p.add_argument("--relative-margin", type=float, default=None, help="0.05 = NV-Retriever's TopK-PercPos 95%%")
    p.add_argument("--sampling-strategy", choices=("top", "random"), default="top")
    p.add_argument("--include-positives", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed of --sampling-strategy random (each chunk derives its own)")
    p.add_argument("--index", choices=("flat", "ivf", "hnsw"), default="flat", help="faiss index of the corpus (flat: exact)")
    p.add_argument("--batch-size", type=int, default=64, help="texts per encoder batch")
    p.add_argument("--chunk-size", type=int, default=10000, help="queries mined (and appended) at a time")
    p.add_argument("--device", default=None, help="encoder device (default: cuda when available, else cpu)")
    return p


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        parser().print_help()
        return 0
    args, overrides = parser().parse_known_args(argv)
    unknown = [a for a in overrides if not a.startswith("--data.")]
    if unknown:
        parser().error(f"unrecognized arguments: {' '.join(unknown)} (overrides must start with --data.)")
    from jsonargparse import ArgumentError

    from datamodules import DatasetFormatError

    try:
        return run(args, overrides)
    except (MineError, DatasetFormatError, OSError, ValueError, TypeError, ArgumentError) as err:
        print(f"hardneg mine: {err}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, overrides: list[str]) -> int:
    out = Path(args.out)
    progress_path, cache_path = Path(str(out) + PROGRESS_SUFFIX), Path(str(out) + CACHE_SUFFIX)
    system = args.system or model_label(args.model)
    settings = {"model": str(args.model), "model_config": args.model_config, "data": str(Path(args.data).resolve()), "data_overrides": overrides,
                "system": system, **{k: getattr(args, k) for k in MINING_KEYS}}
    progress = read_progress(progress_path, out, settings)
    if progress is not None and progress["complete"]:
        print(f"hardneg mine: {out} is complete ({progress['total']:,} queries); "
              f"{progress['short']:,} queries have fewer than {args.num_negatives} negatives")
        return 0

    import numpy as np
    import torch

    from contracts.index import build_index
    from experiments.atomic import atomic_write, atomic_write_json
    from experiments.data_check import build_datamodule, load_data_spec
    from miners.mine_hard_negatives import check_mining_settings

    datamodule = build_datamodule(load_data_spec(Path(args.data)), overrides)
    datamodule.prepare_splits()
    data = getattr(datamodule, "data", None)
    if data is None or not hasattr(data, "corpus") or getattr(data, "train", None) is None:
        raise MineError(f"{args.data}: {type(datamodule).__name__} is not a query/document DataModule (datamodules.QueryDocDataModule "
                        f"with a train split); hardneg mine needs a corpus and train queries with qrels")
    train = data.train
    n_queries, max_positives = len(train.queries), max((len(q) for q in train.qrels), default=0)
    # the settings checks now, before minutes of encoding
    check_mining_settings(args.num_negatives, args.range_min, args.range_max, max_positives, args.sampling_strategy, max(args.chunk_size, 1),
                    filtered=args.absolute_margin is not None or args.relative_margin is not None or args.max_score is not None)
    if args.chunk_size < 1 or args.batch_size < 1:
        raise MineError(f"--chunk-size and --batch-size must be positive, got {args.chunk_size} and {args.batch_size}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    query_encoder, doc_encoder = load_encoders(args.model, args.model_config)
    query_prefix = getattr(datamodule, "query_prefix", None) or getattr(query_encoder, "query_prefix", None)
    doc_prefix = getattr(datamodule, "doc_prefix", None) or getattr(doc_encoder, "doc_prefix", None)
    # queries at the length they are trained at (HFTextEncoder(query_max_length=...)); an encoder without one keeps its own encode()
    query_length = getattr(query_encoder, "query_max_length", None)
    query_kwargs = {"max_length": query_length} if query_length is not None else {}

    if progress is None:
        progress = {"settings": settings, "done": 0, "bytes": 0, "short": 0, "total": n_queries, "complete": False}
        cache_path.unlink(missing_ok=True)
        atomic_write_json(progress_path, progress)  # first: from here on, an empty or missing OUT is ours to continue
        atomic_write(out, lambda f: None)
    elif progress["total"] != n_queries:
        raise MineError(f"{progress_path}: the interrupted run had {progress['total']} train queries, the DataModule now gives {n_queries}; "
                        f"the data changed: delete {out} and {progress_path} to start over")

    if cache_path.is_file():
        corpus_emb = np.load(cache_path, mmap_mode="r")
        if corpus_emb.shape[0] != len(data.corpus):
            raise MineError(f"{cache_path} holds {corpus_emb.shape[0]} embeddings for a corpus of {len(data.corpus)}; delete it to re-encode")
        print(f"hardneg mine: corpus embeddings from {cache_path}", file=sys.stderr)
    else:
        print(f"hardneg mine: encoding {len(data.corpus):,} documents", file=sys.stderr)
        emb = doc_encoder.encode(list(data.corpus), batch_size=args.batch_size, prefix=doc_prefix, device=device, show_progress=True).numpy()
        atomic_write(cache_path, lambda f: np.save(f, emb), mode="wb")
        corpus_emb = emb
    index = build_index(corpus_emb, "ip", args.index, normalize=True)
    doc_ids = data.doc_ids
    system_key = system

    if not out.is_file():
        atomic_write(out, lambda f: None)
    with open(out, "r+b") as f:
        f.truncate(progress["bytes"])  # drop a torn append of the interrupted run
    if progress["done"] < n_queries:
        print(f"hardneg mine: mining {n_queries - progress['done']:,} of {n_queries:,} train queries", file=sys.stderr)
    for start in range(progress["done"], n_queries, args.chunk_size):
        stop = min(start + args.chunk_size, n_queries)
        texts = [train.queries[i] for i in range(start, stop)]
        query_emb = query_encoder.encode(texts, batch_size=args.batch_size, prefix=query_prefix, device=device, show_progress=n_queries > args.batch_size,
                                         **query_kwargs)
        qrels = [list(train.qrels[i]) for i in range(start, stop)]
        ids = mine_chunk(query_emb, corpus_emb, qrels, index, max_positives, random.Random(f"{args.seed}:{start}"), args)
        lines = []
        for row, (pos, neg) in enumerate(zip(qrels, ids.tolist())):
            neg = [d for d in neg if d >= 0]
            qid = official_id(train.query_ids, start + row)
            lines.append(json.dumps({"qid": qid, "pos": [official_id(doc_ids, d) for d in pos],
                                     "neg": {system_key: [official_id(doc_ids, d) for d in neg]}}) + "\n")
        payload = "".join(lines).encode("utf-8")
        with open(out, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        progress.update(done=stop, bytes=progress["bytes"] + len(payload), short=progress["short"] + int((ids < 0).any(1).sum()))
        atomic_write_json(progress_path, progress)
    progress["complete"] = True
    atomic_write_json(progress_path, progress)
    cache_path.unlink(missing_ok=True)
    print(f"hardneg mine: wrote {n_queries:,} queries to {out} (system {system!r}); "
          f"{progress['short']:,} queries have fewer than {args.num_negatives} negatives")
    return 0


def mine_chunk(query_emb, corpus_emb, qrels, index, max_positives: int, rng: random.Random, args: argparse.Namespace):
    """One chunk of queries through ``miners.mine_hard_negatives`` against the prebuilt corpus index."""
    from miners.mine_hard_negatives import mine_hard_negatives

    return mine_hard_negatives(
        query_emb, corpus_emb, qrels, num_negatives=args.num_negatives, range_min=args.range_min, range_max=args.range_max,
        max_score=args.max_score, min_score=args.min_score, absolute_margin=args.absolute_margin, relative_margin=args.relative_margin,
        sampling_strategy=args.sampling_strategy, include_positives=args.include_positives, seed=rng, max_positives=max_positives, index=index,
    )


def read_progress(progress_path: Path, out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The interrupted (or finished) run's progress, checked against this run's settings; ``None`` for a fresh start."""
    if not progress_path.is_file():
        if out.exists():
            raise MineError(f"{out} exists but has no {progress_path.name}, so it is not the output of an interrupted hardneg mine; "
                            f"remove it or choose another --out")
        return None
    try:
        progress = json.loads(progress_path.read_text())
        keys = {"settings", "done", "bytes", "short", "total", "complete"}
        if not isinstance(progress, dict) or not keys <= set(progress):
            raise ValueError(f"expected a JSON object with {sorted(keys)}")
    except ValueError as err:
        raise MineError(f"{progress_path} is not a hardneg mine progress file ({err}); delete it and {out} to start over") from None
    differs = {k: (progress["settings"].get(k), v) for k, v in settings.items() if progress["settings"].get(k) != v}
    if differs:
        what = ", ".join(f"{k}: {old!r} then, {new!r} now" for k, (old, new) in differs.items())
        raise MineError(f"{out} was mined with other settings ({what}); rerun with the same settings to resume, "
                        f"or choose another --out (or delete {out} and {progress_path.name})")
    if progress["bytes"] and (not out.is_file() or out.stat().st_size < progress["bytes"]):
        raise MineError(f"{out} is shorter than the {progress['bytes']} bytes {progress_path.name} records; it was changed after the run: "
                        f"delete both to start over")
    return progress


def official_id(ids, row: int) -> int | str:
    """The official id of ``row`` (an int when it is one, as MS MARCO's), or the row itself without ids."""
    if ids is None:
        return int(row)
    value = ids[row]
    text = str(value).strip()
    return int(text) if text.lstrip("-").isdigit() else text


def model_label(model: str) -> str:
    """The default ``--system`` name: the preset name, or the folder / run name of a path."""
    path = Path(model)
    if not path.exists():
        return model
    if path.suffix == ".ckpt":
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return f"{run.name}-{path.stem}"
    return path.name


def load_encoders(model: str, model_config: str | None = None):
    """``(query_encoder, doc_encoder)`` (the same object for a siamese model) from a preset name, a
    transformers folder or a hardneg run's ``.ckpt``; each must have ``encode(texts, ...)``."""
    path = Path(model)
    if path.suffix == ".ckpt" or path.is_file():
        encoders = encoders_from_checkpoint(path, model_config)
    elif path.is_dir():
        from models.hf_text_encoder import HFTextEncoder

        encoder = HFTextEncoder(str(path))
        encoders = (encoder, encoder)
    else:
        from models import create_encoder

        encoder = create_encoder(model)
        encoders = (encoder, encoder)
    for encoder in encoders:
        if not callable(getattr(encoder, "encode", None)):
            raise MineError(f"--model {model}: {type(encoder).__name__} has no encode(texts) method; hardneg mine needs a text encoder "
                            f"(models.HFTextEncoder, a text preset such as minilm-l6)")
    return encoders


def encoders_from_checkpoint(ckpt: Path, model_config: str | None):
    """Rebuild a run's text encoder(s) from its config and load the checkpoint's weights into them."""
    import torch
    import yaml

    from experiments.data_check import build_component

    if not ckpt.is_file():
        raise MineError(f"--model {ckpt}: checkpoint file not found")
    if model_config is None:
        candidates = [ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise MineError(f"--model {ckpt}: no config.yaml in {ckpt.parent} or {ckpt.parent.parent}; give the run config with --model-config")
        model_config = str(found)
    config = yaml.safe_load(Path(model_config).read_text()) or {}
    init_args = ((config.get("model") or {}).get("init_args")) or {}
    names = [n for n in ("query_encoder", "encoder") if isinstance(init_args.get(n), dict)]
    if not names:
        raise MineError(f"{model_config}: model.init_args has no query_encoder or encoder (class_path/init_args) to rebuild")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    built = []
    for name in (names[0], "doc_encoder"):
        spec = init_args.get(name)
        if name == "doc_encoder" and not isinstance(spec, dict):
            built.append(built[0])
            break
        encoder = build_component(spec)
        prefix = f"{name}."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not weights:
            raise MineError(f"--model {ckpt}: its state_dict has no '{prefix}*' weights; expected a checkpoint of the run of {model_config}")
        missing, unexpected = encoder.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise MineError(f"--model {ckpt}: the {name} of {model_config} does not fit the checkpoint (missing {missing[:5]}, unexpected "
                            f"{unexpected[:5]})")
        built.append(encoder)
    return built[0], built[1]

"""Offline image-text data: two-garment scenes rendered from Fashion-MNIST, captions from templates,
and rule-based compositional hard negatives.

No image-text corpus can be downloaded here, so the quickstart and the tests of the CLIP regime use
scenes generated from the Debian copy of Fashion-MNIST (Xiao, Rasul, Vollgraf, "Fashion-MNIST: a
Novel Image Dataset for Benchmarking Machine Learning Algorithms", 2017). A scene is a
``SceneSpec``: two items (a Fashion-MNIST class, a colour, the index of the 28x28 image that draws
it) and a spatial relation. It is rendered on an RGB canvas (default 64x64): each item's grayscale
image tints its colour over a dark background, the two side by side. Its caption comes from one of a
few paraphrase templates ("a red sneaker to the left of a blue bag", "a blue bag to the right of a
red sneaker" ...), so a test image has several captions.

Compositional split: a (class, colour) combination is *held out* when
``(class + colour_index) % HELD_OUT_MODULUS == 0`` (16 of the 80 combinations). Train scenes contain
only seen combinations and use Fashion-MNIST train images; every test scene contains at least one
held-out combination and uses test images, so the test captions describe attribute bindings the
model never saw (the setting of compositional probes such as Thrush et al., "Winoground", CVPR 2022,
and Yuksekgonul et al., "When and why vision-language models behave like bags-of-words" (ARO), ICLR 2023).

Hard negatives (``NEGATIVE_RULES``): functions ``rule(spec, rng, pool) -> SceneSpec | None`` that edit
the spec, the perturbation families of ARO (Sec. 3, relation/attribute order swaps) and of the
negative captions of Doveh et al., "Teaching Structured Vision&Language Concepts to Vision&Language
Models" (CVPR 2023): swap the two objects, swap the two attributes, replace an object, replace an
attribute, replace the relation. The negative caption is the negative spec through the positive's
template, and the negative *image* is the rendering of the negative spec: the pairing of a hard
negative caption with its own image of TripletCLIP (Patel et al., "TripletCLIP: Improving
Compositional Reasoning of CLIP via Synthetic Vision-Language Negatives", NeurIPS 2024, Sec. 3).
A rule is any such callable, so a new family is one function.

``generate_scenes`` writes the train split as webdataset tar shards and as a CSV with PNG files, and
the test split likewise (several captions per test image: CSV rows repeating the image, ``.txt``
lines in a shard), once: a manifest of the parameters is written last, and a second call with the
same parameters returns the existing files.

The offline compositional test set built from these scenes (a negative caption and image per
held-out scene and rule) is ``datamodules.compositional_test_set``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from datamodules.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist

CLASS_NAMES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (230, 210, 40),
    "orange": (240, 140, 30),
    "purple": (150, 60, 200),
    "pink": (240, 120, 180),
    "white": (235, 235, 235),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND: tuple[int, int, int] = (18, 18, 24)
HELD_OUT_MODULUS = 5
RELATIONS = ("left", "right")
# Paraphrases of one scene; ``{a_first}`` is "a red sneaker", ``{rel}`` the side of the first item, ``{opp}`` the other.
TEMPLATES: tuple[str, ...] = (
    "{a_first} to the {rel} of {a_second}",
    "a photo of {a_first} to the {rel} of {a_second}",
    "{a_second} to the {opp} of {a_first}",
    "{a_first} on the {rel} and {a_second} on the {opp}",
    "on the {rel} there is {a_first}, on the {opp} {a_second}",
)
ZERO_SHOT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a {}.", "a white {}.")
FORMAT_VERSION = 1
MANIFEST = "scenes.json"


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class SceneItem:
    """One garment of a scene: Fashion-MNIST class ``cls`` (0-9), a colour name of ``COLOURS``, and
    ``image``, the index of the Fashion-MNIST image (of the scene's split) that draws it."""

    cls: int
    colour: str
    image: int

    @property
    def phrase(self) -> str:
        return f"{self.colour} {CLASS_NAMES[self.cls]}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene: ``first`` is to the ``relation`` ("left" or "right") of ``second``. Rendering puts
    ``first`` on the ``relation`` half of the canvas and ``second`` on the other."""

    first: SceneItem
    second: SceneItem
    relation: str

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"SceneSpec relation must be one of {RELATIONS}, got {self.relation!r}")

    @property
    def left(self) -> SceneItem:
        return self.first if self.relation == "left" else self.second

    @property
    def right(self) -> SceneItem:
        return self.second if self.relation == "left" else self.first

    def combinations(self) -> tuple[tuple[int, str], tuple[int, str]]:
        return (self.first.cls, self.first.colour), (self.second.cls, self.second.colour)


def is_held_out(cls: int, colour: str) -> bool:
    """The compositional split: (class, colour) is a test-only combination iff ``(cls + colour index) % 5 == 0``."""
    return (int(cls) + COLOUR_NAMES.index(colour)) % HELD_OUT_MODULUS == 0


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(spec: SceneSpec, template: int | str = 0) -> str:
    """The caption of ``spec`` through ``template`` (an index of ``TEMPLATES`` or a format string)."""
    fmt = TEMPLATES[template] if isinstance(template, int) else template
    opp = "right" if spec.relation == "left" else "left"
    return fmt.format(a_first=with_article(spec.first.phrase), a_second=with_article(spec.second.phrase), rel=spec.relation, opp=opp)


# ------------------------------------------------------------------------------------- rendering
def tint(image: np.ndarray, colour: Sequence[int], background: Sequence[int] = BACKGROUND) -> np.ndarray:
    """A grayscale ``[h, w]`` uint8 image as RGB ``[h, w, 3]``: intensity blends ``background`` into ``colour``."""
    alpha = image.astype(np.float32)[..., None] / 255.0
    out = np.asarray(background, np.float32) * (1.0 - alpha) + np.asarray(colour, np.float32) * alpha
    return np.rint(out).astype(np.uint8)


def render(spec: SceneSpec, images: np.ndarray, size: int = 64) -> np.ndarray:
    """The scene as an RGB ``[size, size, 3]`` uint8 array; ``images`` are the split's Fashion-MNIST
    images ``[N, 28, 28]``. Each item sits centred in its half of the canvas."""
    h, w = images.shape[1:3]
    if size < 2 * w:
        raise ValueError(f"render: canvas size {size} cannot hold two {w}-pixel items side by side; use size >= {2 * w}")
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND
    top = (size - h) // 2
    for item, centre in ((spec.left, size // 4), (spec.right, 3 * size // 4)):
        x = min(max(centre - w // 2, 0), size - w)
        canvas[top : top + h, x : x + w] = tint(images[item.image], COLOURS[item.colour])
    return canvas


def render_single(image: np.ndarray, colour: str = "white", size: int = 64) -> np.ndarray:
    """One Fashion-MNIST image centred on the scene canvas (the zero-shot classification images)."""
    h, w = image.shape
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = BACKGROUND
    top, x = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, x : x + w] = tint(image, COLOURS[colour])
    return canvas


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- negative rules
NegativeRule = Callable[[SceneSpec, np.random.Generator, Mapping[int, np.ndarray]], "SceneSpec | None"]


def swap_objects(spec: SceneSpec, rng: np.random.Generator, pool: Mapping[int, np.ndarray]) -> SceneSpec | None:
    """The two objects trade places, each keeping its image; the colours stay where they were
    ("a red bag to the left of a blue sneaker" for "a red sneaker to the left of a blue bag")."""
    a, b = spec.first, spec.second
    if a.cls == b.cls:
        return None
    return replace(spec, first=SceneItem(b.cls, a.colour, b.image), second=SceneItem(a.cls, b.colour, a.image))


def swap_attributes(spec: SceneSpec, rng: np.random.Generator, pool: Mapping[int, np.ndarray]) -> SceneSpec | None:
    """The two colours trade objects ("a blue sneaker to the left of a red bag")."""
    a, b = spec.first, spec.second
    if a.colour == b.colour:
        return None
    return replace(spec, first=replace(a, colour=b.colour), second=replace(b, colour=a.colour))


def replace_object(spec: SceneSpec, rng: np.random.Generator, pool: Mapping[int, np.ndarray]) -> SceneSpec | None:
    """One object (chosen at random) becomes another class absent from the scene, drawn by another image of that class."""
    which = "first" if rng.random() < 0.5 else "second"
    item = getattr(spec, which)
    choices = [c for c in sorted(pool) if c not in (spec.first.cls, spec.second.cls) and len(pool[c])]
    if not choices:
        return None
    cls = int(choices[rng.integers(len(choices))])
    return replace(spec, **{which: SceneItem(cls, item.colour, int(pool[cls][rng.integers(len(pool[cls]))]))})


def replace_attribute(spec: SceneSpec, rng: np.random.Generator, pool: Mapping[int, np.ndarray]) -> SceneSpec | None:
    """One object (chosen at random) gets another colour absent from the scene."""
    which = "first" if rng.random() < 0.5 else "second"
    choices = [c for c in COLOUR_NAMES if c not in (spec.first.colour, spec.second.colour)]
    return replace(spec, **{which: replace(getattr(spec, which), colour=choices[rng.integers(len(choices))])})


def replace_relation(spec: SceneSpec, rng: np.random.Generator, pool: Mapping[int, np.ndarray]) -> SceneSpec:
    """Left becomes right ("a red sneaker to the right of a blue bag"): the rendering mirrors the layout."""
    return replace(spec, relation="right" if spec.relation == "left" else "left")


NEGATIVE_RULES: dict[str, NegativeRule] = {
    "swap_objects": swap_objects,
    "swap_attributes": swap_attributes,
    "replace_object": replace_object,
    "replace_attribute": replace_attribute,
    "replace_relation": replace_relation,
}


def resolve_rules(rules: Sequence[str] | Mapping[str, NegativeRule] | None) -> dict[str, NegativeRule]:
    """``None``: every rule of ``NEGATIVE_RULES``; names: those rules; a mapping: the given callables."""
    if rules is None:
        return dict(NEGATIVE_RULES)
    if isinstance(rules, Mapping):
        bad = [name for name, fn in rules.items() if not callable(fn)]
        if bad:
            raise TypeError(f"negative rules {bad} are not callable; a rule is rule(spec, rng, pool) -> SceneSpec | None")
        return dict(rules)
    unknown = [r for r in rules if r not in NEGATIVE_RULES]
    if unknown:
        raise ValueError(f"unknown negative rule(s) {unknown}; known: {sorted(NEGATIVE_RULES)}")
    return {r: NEGATIVE_RULES[r] for r in rules}


def make_negative(
    spec: SceneSpec,
    rng: np.random.Generator,
    pool: Mapping[int, np.ndarray],
    rules: Mapping[str, NegativeRule],
    allowed: Callable[[int, str], bool] | None = None,
) -> tuple[str, SceneSpec] | None:
    """A hard negative of ``spec``: the rules in a random order, the first whose edit differs from
    ``spec`` and whose combinations all pass ``allowed`` (train negatives must not show held-out
    combinations). ``(rule name, negative spec)``, or ``None`` when no rule applies."""
    names = list(rules)
    for k in rng.permutation(len(names)):
        neg = rules[names[k]](spec, rng, pool)
        if neg is None or neg == spec:
            continue
        if allowed is None or all(allowed(c, col) for c, col in neg.combinations()):
            return names[k], neg
    return None


# ------------------------------------------------------------------------------------ sampling
def class_pool(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Class -> indices of its images."""
    labels = np.asarray(labels)
    return {int(c): np.flatnonzero(labels == c) for c in range(len(CLASS_NAMES))}


def sample_scenes(n: int, labels: np.ndarray, rng: np.random.Generator, split: str) -> list[SceneSpec]:
    """``n`` scenes of two items of different classes and different colours. ``split="train"``: both
    combinations seen; ``"test"``: one item (left or right at random) held out, the other any combination."""
    if split not in ("train", "test"):
        raise ValueError(f"sample_scenes split must be 'train' or 'test', got {split!r}")
    pool = class_pool(labels)
    combos = [(c, col) for c in range(len(CLASS_NAMES)) for col in COLOUR_NAMES if len(pool[c])]
    seen = [x for x in combos if not is_held_out(*x)]
    held = [x for x in combos if is_held_out(*x)]
    if not seen or not held:
        raise ValueError(f"sample_scenes: the {split} images cover too few classes ({sorted(c for c in pool if len(pool[c]))})")
    specs = []
    for _ in range(n):
        first_pool, second_pool = (seen, seen) if split == "train" else (held, combos)
        a = first_pool[rng.integers(len(first_pool))]
        partners = [x for x in second_pool if x[0] != a[0] and x[1] != a[1]]
        b = partners[rng.integers(len(partners))]
        if split == "test" and rng.random() < 0.5:
            a, b = b, a
        items = [SceneItem(c, col, int(pool[c][rng.integers(len(pool[c]))])) for c, col in (a, b)]
        specs.append(SceneSpec(items[0], items[1], RELATIONS[int(rng.integers(2))]))
    return specs


# ----------------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class ScenePaths:
    """The files ``generate_scenes`` wrote: brace patterns of the shards (``ImageTextDataModule``
    reads them as given) and the CSV files (image paths relative to ``root``)."""

    root: Path
    train_shards: str
    test_shards: str
    train_csv: Path
    test_csv: Path
    manifest: Path


def shard_pattern(folder: Path, prefix: str, count: int) -> str:
    return str(folder / f"{prefix}-{{000000..{count - 1:06d}}}.tar")


def _record_rows(
    split: str, specs: list[SceneSpec], images: np.ndarray, rng: np.random.Generator, n_captions: int, size: int,
    rules: Mapping[str, NegativeRule] | None, pool: Mapping[int, np.ndarray],
) -> list[dict[str, Any]]:
    records = []
    allowed = (lambda c, col: not is_held_out(c, col)) if split == "train" else None
    for i, spec in enumerate(specs):
        templates = [int(t) for t in rng.choice(len(TEMPLATES), size=n_captions, replace=False)]
        rec: dict[str, Any] = {"key": f"{i:06d}", "spec": spec, "png": png_bytes(render(spec, images, size)),
                               "captions": [caption(spec, t) for t in templates]}
        if rules is not None:
            neg = make_negative(spec, rng, pool, rules, allowed)
            if neg is not None:
                rec["rule"], rec["neg_spec"] = neg
                rec["neg_captions"] = [caption(neg[1], t) for t in templates]
                rec["neg_png"] = png_bytes(render(neg[1], images, size))
        records.append(rec)
    return records


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: the same seed writes the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_split(build: Path, split: str, records: list[dict[str, Any]], shard_size: int, with_negatives: bool) -> tuple[int, list[str]]:
    """PNG files + ``{split}.csv`` + tar shards into ``build``; returns (shard count, written names)."""
    img_dir = build / f"{split}-images"
    img_dir.mkdir()
    rows = []
    for rec in records:
        (img_dir / f"{rec['key']}.png").write_bytes(rec["png"])
        if "neg_png" in rec:
            (img_dir / f"{rec['key']}.neg.png").write_bytes(rec["neg_png"])
        for j, cap in enumerate(rec["captions"]):
            row = [f"{split}-images/{rec['key']}.png", cap]
            if with_negatives:
                has = "neg_png" in rec
                row += [rec["neg_captions"][j] if has else "", f"{split}-images/{rec['key']}.neg.png" if has else ""]
            rows.append(row)
    with open(build / f"{split}.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"] + (["neg_caption", "neg_image"] if with_negatives else []))
        writer.writerows(rows)
    n_shards = max(1, -(-len(records) // shard_size))
    for s in range(n_shards):
        with tarfile.open(build / f"{split}-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for rec in records[s * shard_size : (s + 1) * shard_size]:
                _add_member(tar, f"{rec['key']}.png", rec["png"])
                _add_member(tar, f"{rec['key']}.txt", "\n".join(rec["captions"]).encode())
                if "neg_png" in rec:
                    _add_member(tar, f"{rec['key']}.neg_caption", "\n".join(rec["neg_captions"]).encode())
                    _add_member(tar, f"{rec['key']}.neg_image.png", rec["neg_png"])
    return n_shards, [f"{split}-images", f"{split}.csv", *(f"{split}-{s:06d}.tar" for s in range(n_shards))]


def _paths(root: Path, manifest: dict[str, Any]) -> ScenePaths:
    return ScenePaths(root, shard_pattern(root, "train", manifest["train_shards"]), shard_pattern(root, "test", manifest["test_shards"]),
                      root / "train.csv", root / "test.csv", root / MANIFEST)


def generate_scenes(
    out_dir: str | Path,
    n_train: int = 10_000,
    n_test: int = 1_000,
    seed: int = 0,
    shard_size: int = 1_000,
    with_negatives: bool = False,
    captions_per_test_image: int = 3,
    image_size: int = 64,
    rules: Sequence[str] | None = None,
    fashion_mnist_root: str | Path = DEBIAN_ROOT,
) -> ScenePaths:
    """Write the scene dataset into ``out_dir`` (once) and return its paths.

    Layout: ``train-000000.tar ...`` and ``test-000000.tar ...`` (webdataset samples ``KEY.png``,
    ``KEY.txt`` with one caption per line, and with negatives ``KEY.neg_caption`` and
    ``KEY.neg_image.png``), ``train.csv``/``test.csv`` (``image,caption[,neg_caption,neg_image]``,
    one row per caption, images in ``train-images/``, ``test-images/``) and ``scenes.json``, the
    parameters, written last. A call whose parameters equal the manifest's returns at once;
    otherwise the split is built in a temporary folder inside ``out_dir`` and moved into place,
    so an interrupted call leaves no manifest and the next call rebuilds.

    Args:
        n_train, n_test: scenes per split (train: one caption each; test: ``captions_per_test_image``).
        seed: everything (scenes, templates, negatives) is a function of it.
        shard_size: samples per tar shard.
        with_negatives: also write a hard negative per scene (see ``make_negative``; train negatives
            never show a held-out combination; a scene no rule applies to has none: empty CSV cells).
        image_size: canvas height and width (>= 56).
        rules: names of ``NEGATIVE_RULES`` to draw from (default: all).
        fashion_mnist_root: the folder of the Fashion-MNIST idx files.
    """
    if n_train < 1 or n_test < 1 or shard_size < 1:
        raise ValueError(f"generate_scenes needs n_train, n_test, shard_size >= 1, got {n_train}, {n_test}, {shard_size}")
    if not 1 <= captions_per_test_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_test_image must be in 1..{len(TEMPLATES)} (the number of templates), got {captions_per_test_image}")
    rule_map = resolve_rules(rules) if with_negatives else None
    params = {"version": FORMAT_VERSION, "n_train": n_train, "n_test": n_test, "seed": seed, "shard_size": shard_size,
              "with_negatives": with_negatives, "captions_per_test_image": captions_per_test_image, "image_size": image_size,
              "rules": sorted(rule_map) if rule_map is not None else None}
    root = Path(out_dir)
    manifest_path = root / MANIFEST
    old = _read_manifest(manifest_path)
    if old is not None and old.get("params") == params and all((root / name).exists() for name in old.get("files", [])):
        return _paths(root, old)

    arrays = load_fashion_mnist(fashion_mnist_root)
    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".scenes-build-", dir=root))
    try:
        manifest: dict[str, Any] = {"params": params, "files": []}
        for split, n, n_caps, code in (("train", n_train, 1, 1), ("test", n_test, captions_per_test_image, 2)):
            images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
            specs = sample_scenes(n, labels, np.random.default_rng([seed, code, 0]), split)
            records = _record_rows(split, specs, images, np.random.default_rng([seed, code, 1]), n_caps, image_size, rule_map, class_pool(labels))
            n_shards, names = _write_split(build, split, records, shard_size, with_negatives)
            manifest[f"{split}_shards"] = n_shards
            manifest["files"] += names
            manifest[f"{split}_negatives"] = sum("neg_png" in r for r in records)
            with open(build / f"{split}-specs.jsonl", "w") as f:
                for rec in records:
                    f.write(json.dumps({"key": rec["key"], "spec": asdict(rec["spec"]), "rule": rec.get("rule"),
                                        "neg_spec": asdict(rec["neg_spec"]) if "neg_spec" in rec else None}) + "\n")
            manifest["files"].append(f"{split}-specs.jsonl")
        if manifest_path.exists():
            manifest_path.unlink()  # from here until the new manifest lands the folder reads as incomplete
        for name in (old or {}).get("files", []):
            if name not in manifest["files"]:
                _remove(root / name)
        for name in manifest["files"]:
            _remove(root / name)
            os.replace(build / name, root / name)
        tmp = build / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, manifest_path)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _paths(root, manifest)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def read_specs(path: str | Path) -> list[dict[str, Any]]:
    """The scene specs of a split as written (``train-specs.jsonl``): key, spec, negative rule and spec."""
    out = []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            row["spec"] = spec_from_dict(row["spec"])
            row["neg_spec"] = spec_from_dict(row["neg_spec"]) if row["neg_spec"] else None
            out.append(row)
    return out


def spec_from_dict(d: Mapping[str, Any]) -> SceneSpec:
    return SceneSpec(SceneItem(**d["first"]), SceneItem(**d["second"]), d["relation"])


# ------------------------------------------------------------------- compositional test set

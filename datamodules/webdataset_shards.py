"""Webdataset tar shards, read with ``tarfile``: shard patterns, the samples of a shard, a scan of the headers.

A shard is a tar file in the webdataset layout (Breuel, the ``webdataset`` format: a sample is the
run of consecutive members sharing a key, the member name up to its first dot):
``KEY.jpg|jpeg|png|webp`` (the image), ``KEY.txt`` (caption(s), one per line; training draws one at
random), optional ``KEY.neg_caption`` (one per line, aligned with the captions) and
``KEY.neg_image.png|jpg``. Shard lists are brace patterns (``scenes-{000000..000009}.tar``,
``{a,b}``), globs, or lists of them (``expand_shards``). Read with ``tarfile``, no extra dependency.

``iter_tar_samples`` yields the samples of one shard in order; a shard that breaks off (truncated,
not a tar) ends with a sample whose ``error`` says so, so its readers (``datamodules.shard_stream``
for training, ``datamodules.image_text_eval`` for evaluation) skip and count it instead of failing.
``scan_shards`` counts the complete samples from the tar headers alone (no image decoded), which is
how ``ImageTextDataModule`` sizes a training epoch.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
NEG_IMAGE_SUFFIXES = ("neg_image.png", "neg_image.jpg", "neg_image.jpeg")
INDEX_SHIFT = 24  # a shard sample's index: shard number << 24 | its position in the shard


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``{000..009}`` (zero-padded numeric ranges) and ``{a,b}``, nested or repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ValueError(f"shard pattern {pattern!r}: braces must hold a range {{000..009}} or a list {{a,b}}, got {{{body}}}")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def expand_shards(spec: str | Sequence[str], what: str = "shards") -> list[str]:
    """The shard files of ``spec``: brace patterns, globs and plain paths, or a list of them, in order.
    Every file must exist: a missing one is named (``FileNotFoundError``)."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[str] = []
    missing: list[str] = []
    for s in specs:
        for path in expand_braces(str(s)):
            if any(ch in path for ch in "*?["):
                found = sorted(glob.glob(path))
                if not found:
                    raise FileNotFoundError(f"{what}: the glob {path} matches no file")
                out += found
            elif not Path(path).is_file():
                missing.append(path)
            else:
                out.append(path)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{what}: {len(missing)} of {len(missing) + len(out)} shards of {spec!r} do not exist: {', '.join(missing[:3])}{more}")
    if not out:
        raise FileNotFoundError(f"{what}: {spec!r} names no shard")
    return out


@dataclass
class RawSample:
    """One webdataset sample as read: its members (suffix -> bytes), or ``error`` when the shard broke."""

    shard: int
    position: int
    key: str
    members: dict[str, bytes]
    error: str | None = None

    @property
    def index(self) -> int:
        return (self.shard << INDEX_SHIFT) | self.position

    def image_bytes(self) -> bytes | None:
        return next((self.members[s] for s in IMAGE_SUFFIXES if s in self.members), None)

    def neg_image_bytes(self) -> bytes | None:
        return next((self.members[s] for s in NEG_IMAGE_SUFFIXES if s in self.members), None)

    def lines(self, suffix: str) -> list[str]:
        data = self.members.get(suffix)
        if data is None:
            return []
        return [line.strip() for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]

    def problem(self) -> str | None:
        """Why the sample cannot be used (without decoding its image), or ``None``."""
        if self.error is not None:
            return self.error
        if self.image_bytes() is None:
            return f"no image member (.{'/.'.join(IMAGE_SUFFIXES)})"
        if not self.lines("txt"):
            return "no caption (.txt missing or empty)"
        return None


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/abc.neg_image.png`` -> (``dir/abc``, ``neg_image.png``): the key is the name up to the
    first dot of its last path component, the suffix the rest (lower case)."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (suffix.lower() if dot else "")


def iter_tar_samples(path: str, shard: int = 0, read_data: bool = True) -> Iterator[RawSample]:
    """The samples of one tar shard in order. A shard that breaks off (truncated, not a tar) ends
    with a sample whose ``error`` says so. ``read_data=False`` reads only the headers (members map to b"")."""
    position = 0
    current: RawSample | None = None
    try:
        # Reading data: one sequential stream; headers only: random access, seeking over the data.
        with tarfile.open(path, "r|*" if read_data else "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, suffix = split_member_name(member.name)
                if current is not None and key != current.key:
                    yield current
                    position += 1
                    current = None
                if current is None:
                    current = RawSample(shard, position, key, {})
                if read_data:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} has {len(data)} of its {member.size} bytes")
                    current.members[suffix] = data
                else:
                    current.members[suffix] = b""
            # tarfile ends quietly when the file breaks off inside a header: an uncompressed shard
            # must still hold the end-of-archive blocks after the last member.
            plain = getattr(tar.fileobj, "comptype", "tar") == "tar" and not path.endswith((".gz", ".bz2", ".xz"))
            if plain and os.path.getsize(path) < tar.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("the file ends without the end-of-archive blocks (truncated)")
    except (tarfile.TarError, OSError, EOFError) as err:
        if current is not None:
            current.error = f"shard {path} broke off in sample {current.key!r}: {err}"
            yield current
        else:
            yield RawSample(shard, position, "", {}, error=f"shard {path} is unreadable after {position} samples: {err}")
        return
    if current is not None:
        yield current


@dataclass
class ShardScan:
    """What the headers of a set of shards hold (no image decoded): usable samples, incomplete ones,
    and whether negatives are present."""

    samples: int = 0
    incomplete: int = 0
    with_neg_text: int = 0
    with_neg_image: int = 0
    per_shard: list[int] = field(default_factory=list)  # complete samples
    raw_per_shard: list[int] = field(default_factory=list)  # all samples, as ``ShardStream`` counts positions


def scan_shards(shards: Sequence[str]) -> ShardScan:
    """Count the complete samples of ``shards`` from their member names (tar headers only)."""
    scan = ShardScan()
    for s, path in enumerate(shards):
        n = n_raw = 0
        for raw in iter_tar_samples(path, s, read_data=False):
            n_raw += 1
            if raw.error is None and raw.image_bytes() is not None and "txt" in raw.members:
                n += 1
                scan.with_neg_text += "neg_caption" in raw.members
                scan.with_neg_image += raw.neg_image_bytes() is not None
            else:
                scan.incomplete += 1
        scan.per_shard.append(n)
        scan.raw_per_shard.append(n_raw)
        scan.samples += n
    return scan

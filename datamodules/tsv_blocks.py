"""Tab-separated text files read in blocks of whole lines, with line and field boundaries found by numpy.

Large TSV files (MS MARCO's 3 GB collection, its 400M-line ``qidpidtriples``) are never split into
Python lines: ``iter_line_blocks`` reads a few MB at a time, cuts each block at its last line break,
and finds every line's start and end with vectorised searches; ``parse_int_fields`` turns the digits
between given offsets into int64 the same way. ``datamodules.text_collection`` builds its byte-offset
index with them, ``datamodules.msmarco_files`` parses integer tables.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

BLOCK_BYTES = 8 << 20  # bytes read per block
MAX_ID_DIGITS = 18  # every 18-digit decimal fits in int64


class LineBlock(NamedTuple):
    """Whole lines of a file read in one block: ``buf`` is ``block`` as uint8; line ``i`` of the block is
    ``block[starts[i]:ends[i]]`` (its ``\n`` and a ``\r`` before it excluded); ``used`` bytes of the block end
    at its last line break; ``lines_before`` and ``file_pos`` place the block's first line in the file."""

    block: bytes
    buf: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    used: int
    lines_before: int
    file_pos: int


def iter_line_blocks(path: str | Path, block_bytes: int | None = None, skip_blank_tail: bool = False) -> Iterator[LineBlock]:
    """Read ``path`` in blocks of ``block_bytes`` (default ``BLOCK_BYTES``; callers pass their own module's, which tests shrink), each cut at its last line break
    (the rest carried into the next), with the line boundaries found vectorised. A last line without a
    line break counts as a line; ``skip_blank_tail`` drops it when it is only whitespace."""
    size = BLOCK_BYTES if block_bytes is None else block_bytes
    lines_before, file_pos, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(size)
            block = carry + data if carry else data
            if not data:
                if not (block.strip() if skip_blank_tail else block):
                    return
                block += b"\n"  # a last line without a line break
            buf = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(buf == 10)
            if len(newlines) == 0:
                carry = block
                continue
            used = int(newlines[-1]) + 1
            starts = np.empty(len(newlines), dtype=np.int64)
            starts[0] = 0
            starts[1:] = newlines[:-1] + 1
            ends = newlines.astype(np.int64)
            ends -= (buf[np.maximum(ends - 1, 0)] == 13) & (ends > starts)  # CRLF
            yield LineBlock(block, buf, starts, ends, used, lines_before, file_pos)
            lines_before += len(newlines)
            file_pos += used
            carry = block[used:]
            if not data:
                return


def parse_int_fields(buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decimal integers in ``buf[starts[i]:ends[i]]`` (optional leading ``-``), vectorised over fields.

    Returns ``(values int64 [N], bad bool [N])``; ``bad`` marks empty fields, non-digits and more than
    ``MAX_ID_DIGITS`` digits (their value is meaningless).
    """
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.asarray(ends, dtype=np.int64)
    n = len(starts)
    values = np.zeros(n, dtype=np.int64)
    if n == 0:
        return values, np.zeros(0, dtype=bool)
    nonempty = ends > starts
    negative = nonempty & (buf[np.where(nonempty, starts, 0)] == ord("-"))
    first = starts + negative
    digits = ends - first
    bad = (digits <= 0) | (digits > MAX_ID_DIGITS)
    for d in range(int(min(digits.max(initial=0), MAX_ID_DIGITS))):
        present = d < digits
        ch = buf[np.where(present, first + d, 0)].astype(np.int64) - ord("0")
        bad |= present & ((ch < 0) | (ch > 9))
        values = np.where(present, values * 10 + ch, values)
    return np.where(negative, -values, values), bad

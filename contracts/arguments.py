"""Checks of plain configuration arguments shared by every layer (counts, lengths, sizes).

A config value that should be a count arrives from YAML, the CLI or Python; ``True`` is an ``int``
in Python, so ``isinstance(v, int)`` alone would accept ``max_length: true`` as 1. Callers raise
their own error, naming the argument and the expected value; this module only says whether it holds.
"""

from __future__ import annotations

from typing import Any


def is_int_at_least(value: Any, minimum: int) -> bool:
    """``value`` is an int (not a bool) and ``>= minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum

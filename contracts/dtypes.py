"""The dtype that distances and losses compute in, whatever the dtype of the embeddings (mixed precision)."""

from __future__ import annotations

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in: float32 for half inputs (CPU kernels, exp and squares overflow in fp16), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

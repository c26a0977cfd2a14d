"""Gathering embeddings across DDP ranks, with gradient.

In-batch losses under DDP must see the global batch: every rank gathers all ranks' embeddings and
labels, and the gradient of the gathered tensor flows back to the rank that produced each slice
(the approach of open_clip's ``gather_with_grad``). Because every rank computes the same global loss
and DDP averages gradients over ranks, each rank's local slice must receive the *sum* of the
gradients that all ranks computed for it; DDP's gradient averaging then divides by the world
size. The result equals one process on the concatenated batch.

``rank_world`` and ``rank_sizes`` say where this rank's rows sit in a gathered tensor (the shared
training step and its relevance masks offset by them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        sizes = _gather_sizes(x)
        ctx.rank, ctx.sizes = dist.get_rank(), sizes
        padded = _pad_rows(x, max(sizes))
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded.contiguous())
        return torch.cat([o[:s] for o, s in zip(out, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        # Every rank computed the same global loss, so the summed gradient is world_size times the
        # true one; DDP then averages parameter gradients over ranks, which cancels that factor.
        return grad[start : start + ctx.sizes[ctx.rank]]


def _gather_sizes(x: Tensor) -> list[int]:
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return [int(s) for s in sizes]


def _pad_rows(x: Tensor, n: int) -> Tensor:
    if len(x) == n:
        return x
    return torch.cat([x, x.new_zeros((n - len(x),) + tuple(x.shape[1:]))])


def all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank along dim 0 (rank order); gradients flow back. No-op on one process."""
    if not dist_ready():
        return x
    return _AllGatherWithGrad.apply(x)


def all_gather_no_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (labels, ids, detached values) from every rank along dim 0; no gradient."""
    if not dist_ready():
        return x
    sizes = _gather_sizes(x)
    padded = _pad_rows(x.detach(), max(sizes))
    out = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` on one process."""
    return (dist.get_rank(), dist.get_world_size()) if dist_ready() else (0, 1)


def rank_sizes(n: int, device: torch.device) -> list[int]:
    """Rows of every rank (rank order)."""
    if not dist_ready():
        return [n]
    return [int(s) for s in all_gather_no_grad(torch.tensor([n], device=device))]

"""Cross-rank helpers shared by the tasks. Work unchanged in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient)."""
    rank, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice.

    Uses all_reduce (not reduce_scatter, which gloo lacks), so it runs on CPU too.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.size = world()
        parts = [torch.empty_like(x) for _ in range(ctx.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.size)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


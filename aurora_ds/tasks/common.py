"""Cross-rank helpers shared by the tasks. Work unchanged in a single process.

Ranks may hold batches of different sizes (a worker's last batch of an epoch is partial), so
gathers exchange sizes first and pad to the largest.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_sizes(n: int) -> list[int]:
    """Every rank's number of rows, in rank order."""
    if world()[1] == 1:
        return [n]
    t = torch.tensor([n])
    parts = [torch.zeros_like(t) for _ in range(world()[1])]
    dist.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def row_offset(n: int) -> int:
    """Where this rank's rows start in a gathered tensor."""
    return sum(batch_sizes(n)[: world()[0]])


def _padded_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    longest = max(sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient)."""
    if world()[1] == 1:
        return x
    return _padded_gather(x, batch_sizes(x.shape[0]))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows.

    Uses all_reduce (not reduce_scatter, which gloo lacks), so it runs on CPU too.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.rank = world()[0]
        ctx.sizes = batch_sizes(x.shape[0])
        return _padded_gather(x, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x if world()[1] == 1 else _GatherWithGrad.apply(x)


def any_rank(flag: bool) -> bool:
    if world()[1] == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def lockstep(batches, dummy: dict):
    """(batch, is_real) until every rank's ``batches`` are exhausted.

    Under ZeRO-3 each forward is collective, so a rank that runs out of evaluation data keeps
    stepping with ``dummy`` (its last real batch once it has one) until all ranks are done.
    """
    stream = iter(batches)
    while True:
        batch = next(stream, None)
        if not any_rank(batch is not None):
            return
        if batch is None:
            yield dummy, False
        else:
            dummy = batch
            yield batch, True

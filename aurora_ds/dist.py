"""Every cross-rank operation, and the device collectives run on. Nothing else in aurora_ds
calls ``torch.distributed`` (a test checks it).

Why one owner: NCCL serves CUDA tensors only, gloo serves CPU tensors. Code that hands a CPU
tensor to a collective works on our CPU test machines and stops on the users' GPU clusters at
the first step. Here every tensor is moved to :func:`comm_device` before the collective and
the result handed back on the device the caller's tensor came from, so callers cannot get it
wrong. ``AURORA_STRICT_DEVICES=1`` (the tests and the GPU check set it) additionally refuses a
tensor that is not on the process's compute device (:func:`set_compute_device`): the signature
of state that stayed behind on the CPU while the model moved.

Ranks may hold batches of different sizes (a worker's last batch of an epoch is partial), so
gathers exchange sizes first and pad to the largest. Everything works unchanged in a single
process without an initialised process group.
"""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as _td

_compute_device: torch.device | None = None
# torch 2.14 renamed the flat collectives and warns (FutureWarning) at every call of the old names.
_ALL_GATHER = getattr(_td, "all_gather_single", None) or _td.all_gather_into_tensor
_REDUCE_SCATTER = getattr(_td, "reduce_scatter_single", None) or _td.reduce_scatter_tensor


def use_current_collectives():
    """Point DeepSpeed's communication backend (after ``deepspeed.init_distributed``) at torch's
    current flat collectives: DeepSpeed 0.19 still calls the deprecated names, and each ZeRO
    gather and gradient reduce-scatter then prints a FutureWarning."""
    from deepspeed import comm

    backend = comm.comm.cdb
    if getattr(backend, "all_gather_function", None) is not None:
        backend.all_gather_function = _ALL_GATHER
    if getattr(backend, "reduce_scatter_function", None) is not None:
        backend.reduce_scatter_function = _REDUCE_SCATTER


def is_distributed() -> bool:
    return _td.is_available() and _td.is_initialized()


def world() -> tuple[int, int]:
    """(process rank, world size); (0, 1) without a process group."""
    if is_distributed():
        return _td.get_rank(), _td.get_world_size()
    return 0, 1


def process_rank() -> int:
    return world()[0]


def world_size() -> int:
    return world()[1]


def group_rank(group) -> int:
    """This process's rank within ``group`` (a ZeRO-3 partition group), 0 without one."""
    return _td.get_rank(group=group) if is_distributed() else 0


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if is_distributed() and "nccl" in str(_td.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def set_compute_device(device) -> None:
    """The device this process computes on (the engine sets it once, after choosing a GPU)."""
    global _compute_device
    _compute_device = torch.device(device)


def compute_device() -> torch.device:
    if _compute_device is not None:
        return _compute_device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _strict() -> bool:
    return os.environ.get("AURORA_STRICT_DEVICES", "0") == "1"


def _to_comm(x: torch.Tensor) -> torch.Tensor:
    if _strict() and x.device != compute_device():
        raise RuntimeError(f"AURORA_STRICT_DEVICES: a {tuple(x.shape)} {x.dtype} tensor on {x.device} reached a "
                           f"collective; this process computes on {compute_device()} (state left behind on "
                           "another device?)")
    return x.to(comm_device()).contiguous()


def barrier() -> None:
    if is_distributed():
        _td.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the group down (avoids aborts at interpreter exit)."""
    if is_distributed():
        _td.barrier()
        _td.destroy_process_group()


def batch_sizes(n: int) -> list[int]:
    """Every rank's number of rows, in rank order."""
    size = world_size()
    if size == 1:
        return [n]
    t = torch.tensor([n], device=comm_device())
    parts = [torch.zeros_like(t) for _ in range(size)]
    _td.all_gather(parts, t)
    return [int(p.item()) for p in parts]


def row_offset(n: int) -> int:
    """Where this rank's rows start in a gathered tensor."""
    return sum(batch_sizes(n)[: process_rank()])


def _padded_gather(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    src = _to_comm(x)
    longest = max(sizes)
    if src.shape[0] < longest:
        src = torch.cat([src, src.new_zeros((longest - src.shape[0], *src.shape[1:]))])
    parts = [torch.empty_like(src) for _ in sizes]
    _td.all_gather(parts, src)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(x.device)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient); rows may differ per rank."""
    if world_size() == 1:
        return x
    return _padded_gather(x, batch_sizes(x.shape[0]))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our rows.

    Uses all_reduce (not reduce_scatter, which gloo lacks), so it runs on CPU too.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.process_rank = process_rank()
        ctx.sizes = batch_sizes(x.shape[0])
        return _padded_gather(x, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        total = sum_over_ranks(grad)
        start = sum(ctx.sizes[: ctx.process_rank])
        return total[start:start + ctx.sizes[ctx.process_rank]]


def all_gather_flat(shard: torch.Tensor) -> torch.Tensor:
    """Equal-sized shards of every rank, concatenated flat: the collective ZeRO-3 runs for each
    partitioned module (``all_gather_into_tensor``); the benchmarks time it."""
    src = _to_comm(shard.flatten())
    if world_size() == 1:
        return src.to(shard.device)
    out = src.new_empty(src.numel() * world_size())
    _ALL_GATHER(out, src)
    return out.to(shard.device)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    return x if world_size() == 1 else _GatherWithGrad.apply(x)


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Elementwise sum over ranks (a new tensor on ``x``'s device)."""
    if world_size() == 1:
        return x
    t = _to_comm(x).clone()
    _td.all_reduce(t)
    return t.to(x.device)


def mean_over_ranks(value: torch.Tensor) -> float:
    """The global-batch value of a per-rank mean (what a 1-process run would report)."""
    value = value.detach().float()
    return float(sum_over_ranks(value).item()) / world_size()


def _reduce_int(n: int, op) -> int:
    if world_size() == 1:
        return int(n)
    t = torch.tensor([int(n)], device=comm_device())
    _td.all_reduce(t, op=op)
    return int(t.item())


def min_over_ranks(n: int) -> int:
    return _reduce_int(n, _td.ReduceOp.MIN if is_distributed() else None)


def any_rank(flag: bool) -> bool:
    return bool(_reduce_int(int(flag), _td.ReduceOp.MAX if is_distributed() else None))


class RanksFailed(RuntimeError):
    """Raised on the ranks that did not fail when others did; names them and their errors."""


def fail_once(prog: str, error: BaseException):
    """End a process on an error found at setup: rank 0 says it (every rank found it, or learnt
    of it from the ranks that did), the others exit quietly, so a launch of N ranks prints one
    line, not N tracebacks."""
    rank = process_rank() if is_distributed() else int(os.environ.get("RANK", "0"))
    sys.exit(f"{prog}: {error}" if rank == 0 else 1)


def stop_if_any_rank_failed(error: BaseException | None, what: str) -> None:
    """Every rank says whether ``what`` failed on it (one small all-reduce); if any did, every
    rank stops: the failing ones with their own error, the others with an error naming the
    failing ranks and their messages. Ranks never wait in a model collective for a rank that has
    already given up (which, under ZeRO-3, would be a wait without end)."""
    if not any_rank(error is not None):
        return
    reports = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(reports) if m]
    raise RanksFailed(f"stopping because {what} failed on rank(s) {[r for r, _ in failed]}: "
                       + "; ".join(f"rank {r}: {m}" for r, m in failed))


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (the same list on every rank).

    For small metadata only (ids, captions, answers): tensors go through :func:`gather`.
    """
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    _td.all_gather_object(out, obj)
    return out


def from_rank0(obj):
    """Rank 0's picklable ``obj`` on every rank (one broadcast; the others pass None). What rank 0
    alone builds (a trained tokenizer's files, the answer list) reaches every node this way, not
    through a filesystem that nodes may not share."""
    if world_size() == 1:
        return obj
    box = [obj]
    _td.broadcast_object_list(box, src=0, device=comm_device())
    return box[0]


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


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous on this host)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

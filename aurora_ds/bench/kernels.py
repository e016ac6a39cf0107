"""Kernel-launching ops of a training step: what a step costs on a GPU at BLIP sizes.

There a step is bound by launches, not arithmetic (FIELD-NOTES, "GPU speed"): each dispatched
ATen op that computes something costs about as much host and launch time as the arithmetic of a
BLIP-base step's small GEMMs. The count is taken below autograd with a dispatch mode, excluding
views, allocations and metadata queries, which launch nothing. It does not depend on tensor
sizes, so a CPU run at 32 px and batch 2 counts what a GPU run at 224 px and batch 8 launches.

CPU's dropout is several ops (a Bernoulli draw, a division, a product) where CUDA's
``native_dropout`` is one kernel; a dropout call is counted as one, as CUDA would launch it. A
``_foreach_`` op is one (CUDA splits it into a kernel per chunk of tensors), except where its
tensor lists differ in layout: CUDA then runs it tensor by tensor, counted so.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_FREE = ("_unsafe_view", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
         "lift_fresh", "_to_copy_noop", "resolve_conj", "resolve_neg",
         "_record_function_enter", "_record_function_enter_new", "_record_function_exit")
_DROPOUTS = (torch.nn.functional.dropout, torch.dropout)


def launches(func) -> bool:
    """Whether an ATen op would launch a kernel: not a view, not an allocation, not metadata, not
    a profiler marker (an optimizer step records one)."""
    schema = func._schema
    name = schema.name.split("::")[-1]
    if name in _FREE or name.startswith(("sym_", "is_", "_has_", "size", "stride", "numel", "dim")):
        return False
    return not func.is_view


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching ATen ops by name while active (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.muted = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.muted and launches(func):
            name = func._schema.name.split("::")[-1]
            self.ops[name] += _foreach_kernels(args) if name.startswith("_foreach_") else 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _layout(t: torch.Tensor) -> tuple:
    return tuple((n, s) for n, s in zip(t.shape, t.stride()) if n > 1)


def _foreach_kernels(args) -> int:
    """1, or one per tensor where the op's tensor lists differ in layout (CUDA's slow path)."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
    first = lists[0] if lists else []
    mixed = any(_layout(t) != _layout(f) for other in lists[1:] for t, f in zip(other, first))
    return len(first) if mixed else 1


class _DropoutAsOne(TorchFunctionMode):
    """A dropout call counted as one kernel (CUDA's ``native_dropout``), whatever CPU runs for it."""

    def __init__(self, counter: KernelCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUTS:
            training = kwargs.get("training", kwargs.get("train", args[2] if len(args) > 2 else True))
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if training and p > 0 and not self.counter.muted:
                self.counter.ops["native_dropout"] += 1
                self.counter.muted += 1
                try:
                    return func(*args, **kwargs)
                finally:
                    self.counter.muted -= 1
        return func(*args, **kwargs)


def count_kernels(step) -> Counter:
    """Kernel-launching ops of one call of ``step()``, by op name."""
    counter = KernelCounter()
    with _DropoutAsOne(counter), counter:
        step()
    return counter.ops


# Ops that launch nothing themselves or only through the ops they call (counted instead).
_NO_LAUNCH = set(_FREE) | {"view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand", "as_strided",
                           "select", "slice", "squeeze", "unsqueeze", "unfold", "split", "split_with_sizes", "chunk",
                           "narrow", "unbind", "view_as", "flatten", "unflatten", "contiguous", "to", "matmul",
                           "linear", "dropout", "set_", "resize_", "zeros", "ones", "full", "scalar_tensor"}


def count_compiled(step, generated: int) -> Counter:
    """Kernel-launching ops of one call of a compiled ``step()``: the ``generated`` kernels
    (inductor's, each launched once per call of its graph) and the ATen ops the compiled code
    still calls (GEMMs and convolutions as extern kernels, anything outside the graphs), read
    from a profile, since a dispatch mode cannot run under torch.compile. An op is counted
    where it launches: a composite (``matmul``, ``contiguous``) through the ops it calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ops = Counter({"generated (inductor)": generated})

    def visit(event):
        name = event.name.removeprefix("aten::")
        if event.name.startswith("aten::") and name not in _NO_LAUNCH and not name.startswith(("sym_", "is_", "_has_")):
            ops[name] += 1
            return
        for child in event.cpu_children:
            visit(child)

    for event in prof.events():
        if event.cpu_parent is None:
            visit(event)
    return ops

"""What the adapted model makes once per call instead of once per layer.

On a GPU at BLIP sizes a step costs what it launches (docs/gpu.md): anything that depends only
on parameters (the update matrices of every adapted layer, GQT's scaled vectors) is made for all
layers of a kind in a few batched ops at the first use in a call of the model, and each layer's
backward adds its share of their gradient into one buffer in place, instead of autograd adding
the shares one op at a time.
"""

from __future__ import annotations

import itertools

import torch


def saved_tensor_hooks_active() -> bool:
    """Saved-tensor hooks (activation checkpointing, offloading) are packing what autograd keeps:
    reading another node's saved tensors would unpack (recompute, copy back) them in forward."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def partitioned(t: torch.Tensor) -> bool:
    """A ZeRO-3 parameter, gathered only inside its own module's call (and possibly released by
    the time a node's backward runs)."""
    return hasattr(t, "ds_id") and not getattr(t, "ds_persist", False)


class CallMemo:
    """A memo that lives while one call of the model (or of one of its top-level parts) runs,
    and the groups (:class:`Group`) made for a training step.

    Opened by the outermost hooked module's pre-hook (:meth:`attach`) and emptied when it returns.
    A group made with gradients lives on until its backward has run: BLIP's step calls the text
    encoder twice (text alone, then fused with the image), and both calls use one group, so its
    parameters' gradients are made once, not once per call and then added. A group whose inputs
    changed in place since (an optimizer step) is made anew. Off while compiling (the compiler
    fuses per-layer work itself) and under saved-tensor hooks (activation checkpointing
    recomputes a layer on its own and must save what the first pass saved).
    """

    def __init__(self):
        self.owner = None
        self.memo = {}
        self.kept = {}  # key -> a group made with gradients, until its backward ran
        self.members = {}  # group key -> the modules made for together
        self.norms = {}  # id(weight) -> eps of the model's LayerNorms (to make an input again in backward)
        self.traced_owner, self.traced = None, {}  # while compiling: the call being traced, what it made once

    def register(self, key, member):
        self.members.setdefault(key, []).append(member)

    def attach(self, modules):
        for module in modules:
            module.register_forward_pre_hook(self._open)
            module.register_forward_hook(self._close, always_call=True)

    def as_one_call(self, fn):
        """``fn`` run as one call of the model, opened and closed around it as a hooked module's
        call is, so that what is made once per call is made once for every tower ``fn`` calls.
        Eagerly a group made with gradients lives until its backward anyway; a traced call keeps
        what it made only until its outermost hooked module returns, so a compiled step that
        calls BLIP's vision tower and then its text encoder twice would make each kind's update
        blocks three times, and run their backward three times."""
        def call(*args, **kwargs):
            self._open(call, args)
            try:
                return fn(*args, **kwargs)
            finally:
                self._close(call, args, None)

        return call

    def _open(self, module, args):
        if torch.compiler.is_compiling():
            if self.traced_owner is None:
                self.traced_owner, self.traced = module, {}
            return
        self.traced_owner, self.traced = None, {}  # nothing made in a trace outlives it (a graph break)
        if self.owner is None:
            self.owner = module
            for key in [k for k, g in self.kept.items() if not g.current()]:
                self.kept.pop(key).release()

    def _close(self, module, args, output):
        if torch.compiler.is_compiling() or self.traced_owner is module:
            if self.traced_owner is module:
                self.traced_owner, self.traced = None, {}
            return
        if self.owner is module:
            self.owner = None
            self.memo.clear()

    def group(self, key, build) -> "Group":
        """The :class:`Group` of ``key`` in this step, made at its first request from
        ``build()`` = (make, inputs, index: where each user's share lies). Called once per layer
        call: nothing is built unless the group is made."""
        group = self.kept.get(key) or self.memo.get(key)
        if group is None or group.done:
            make, inputs, index = build()
            group = Group(make, inputs)
            group.index = index
            (self.kept if group.trained else self.memo)[key] = group
        return group

    @property
    def active(self) -> bool:
        return (self.owner is not None and not torch.compiler.is_compiling()
                and not torch.is_inference_mode_enabled() and not saved_tensor_hooks_active())


class Sink:
    """A gradient that several consumers of one tensor add their shares into in place (the first
    share is the buffer), read by the tensor's producer once they all ran: autograd would add the
    shares one op at a time. ``dx``: the same for the gradient of the producer's input, from
    consumers that read that input too (the frozen linear run with the update), to which the
    producer adds its own share and returns the sum."""

    grad = None
    dx = None


class Group:
    """Tensors made once per call for several users (``make(*inputs)``, plain differentiable
    ops, one stacked result), and their gradient: either a buffer the users' backward passes
    add their shares into (:meth:`buffer`), made at the first share (in backward, when
    activations are being freed, not at the forward's peak), or shares put in as their users
    made them (:meth:`put`), laid out at the group's backward (:meth:`gradient`).
    """

    def __init__(self, make, inputs):
        self.grad, self.shares, self.index, self.done = None, {}, {}, False
        self.merged = None  # what merged layers make from ``value`` (layer.py), as long as it lives
        self.inputs, self.versions = inputs, [t._version for t in inputs]
        made = make(*inputs)
        self.value = MadeOnce.apply(self, made) if torch.is_grad_enabled() else made
        self.trained = self.value.requires_grad

    def buffer(self) -> torch.Tensor:
        if self.grad is None:
            self.grad = torch.zeros_like(self.value)
        return self.grad

    def release(self):
        """Drop what the group made and gathered, now that no user will read it: its runs
        (layer.py) refer to the group and its value to the node that made it, so it would
        otherwise be freed only by Python's cycle collector, which may run hundreds of steps
        later (BLIP-base: 40 MB of tensors a step in fp32 until then)."""
        self.value = self.merged = self.grad = None
        self.index, self.shares = {}, {}

    def current(self) -> bool:
        """Neither used up by its backward nor made from inputs changed in place since."""
        return not self.done and all(t._version == v for t, v in zip(self.inputs, self.versions))

    def put(self, index, share: torch.Tensor):
        """Keep ``share`` (owned by the group from now on) as a share of ``value[index]``: no op
        per user, where writing it into a buffer would copy or add it."""
        self.shares.setdefault(index, []).append(share)

    def gradient(self) -> torch.Tensor | None:
        """The gradient of ``value``: the buffer, or the shares put in, laid out in two ops
        (one ``_foreach_add_`` per further share of a slice, for all slices; one ``stack``);
        None where no user's backward ran."""
        if not self.shares:
            return self.grad
        lead = self.value.shape[:len(next(iter(self.shares)))]
        slots = [self.shares.get(i, []) for i in itertools.product(*map(range, lead))]
        while any(len(s) > 1 for s in slots):
            more = [s for s in slots if len(s) > 1]
            torch._foreach_add_([s[0] for s in more], [s.pop() for s in more])
        zero = None if all(slots) else torch.zeros_like(next(s[0] for s in slots if s))
        return torch.stack([s[0] if s else zero for s in slots]).view(self.value.shape)


class MadeOnce(torch.autograd.Function):
    """The tensor ``made`` by a group's ``make``, handed to its users as one node whose backward
    runs once, after every user has added its share into ``group.buffer()`` or put it in
    (``group.put``), and returns the sum as ``made``'s gradient: autograd then runs ``make``'s
    own backward in the same pass. Users return no gradient for the made tensor: autograd would
    add their shares one op at a time, and a user that reads a slice would have autograd copy
    the whole stack back per user."""

    @staticmethod
    def forward(ctx, group, made):
        ctx.set_materialize_grads(False)
        ctx.group = group
        return made.detach()

    @staticmethod
    def backward(ctx, _unused):
        group, ctx.group = ctx.group, None  # group -> value -> this node -> group: a cycle
        group.done = True
        grad = group.gradient()
        group.release()
        return None, grad

"""The paper's two alignment modules, each gated so that step 0 equals the frozen model.

Gated Query Transformation (GQT): a learnable scale γ and shift β of an attention block's
output h, blended in through a gate g that starts at zero:

    h' = h + tanh(g) · λ · (h ⊙ γ + β)

Informative Context Enhancement (ICE): the batch-mean text [CLS] feature t̄ added to the fused
[CLS] f before the matching head, through a gate that starts at zero:

    f' = f + tanh(g) · λ · t̄

In training t̄ is the mean over the training batch, as the paper has it. In evaluation it is a
running mean of those batch means kept during training (as BatchNorm keeps its statistics), so
that a pair's score depends on the pair alone, never on which other captions the evaluation
set holds.

γ and β start at N(0, 2e-4) as in the released code, so the gate receives a gradient at step 0
and the two factors follow as soon as it opens.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .once import partitioned


class GatedQueryTransform(nn.Module):
    """GQT for one attention block; attached with :meth:`attach` as a forward hook, or folded
    into the block's output LayerNorm where the block has one (:class:`GatedNorm`)."""

    def __init__(self, width: int, scale: float = 0.1, dtype=None, device=None, memo=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.scale = scale
        self.memo = memo  # the model's once.CallMemo: what every block needs made once per call
        self.folded = None  # the output of this call's folded LayerNorm, until the block's hook has seen it
        self.gamma = nn.Parameter(torch.empty(width, **kw).normal_(0.0, 2e-4))
        self.beta = nn.Parameter(torch.empty(width, **kw).normal_(0.0, 2e-4))
        self.gate = nn.Parameter(torch.zeros(1, **kw))  # 1-d: ZeRO cannot partition 0-d tensors

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        memo = self.memo
        if memo is None or not memo.active or any(partitioned(p) for p in self.parameters()):
            return GatedQuery.apply(h, self.gamma, self.beta, self.gate, self.scale)
        group = self._group(h.dtype, folded=False)
        return GatedQueryShared.apply(h, group.value, group if group.trained else None, group.index[id(self)])

    def attach(self, block: nn.Module):
        """Register as ``block.aurora_gqt`` and transform the block's output on every call:
        inside its output LayerNorm where that makes the output, else in a forward hook."""
        block.add_module("aurora_gqt", self)
        block.register_forward_hook(_apply_gqt)
        norm = _output_norm(block, self.gamma.shape[0])
        # Not a submodule: the LayerNorm's parameters belong to the backbone.
        object.__setattr__(self, "output_norm", norm)
        if self.memo is not None:
            self.memo.register(("gqt", self.scale, norm is not None), self)
        if norm is not None:
            norm.forward = partial(self.gated_norm, norm)

    def gated_norm(self, norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        """The block's output LayerNorm, with GQT folded into its weight and bias where they
        are made once per call; the plain LayerNorm otherwise (the block's hook then applies GQT)."""
        memo = self.memo
        if (memo is None or not memo.active
                or any(partitioned(p) for p in (*self.parameters(), norm.weight, norm.bias))):
            return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        group = self._group(x.dtype, folded=True)
        self.folded = GatedNorm.apply(x, group.value, group if group.trained else None, group.index[id(self)], norm.eps)
        return self.folded

    def _group(self, dtype: torch.dtype, folded: bool):
        """(2, blocks, d) made once per call for every block of this scale: sγ and sβ, or, for the
        blocks whose output LayerNorm GQT is folded into, that LayerNorm's new weight and bias
        w + w ⊙ sγ and b + b ⊙ sγ + sβ (so that its output h becomes h + h ⊙ sγ + sβ)."""
        memo, scale = self.memo, self.scale

        def build():
            members = memo.members[("gqt", scale, folded)]
            n = len(members)

            def make(*params):
                s = (torch.tanh(torch.cat(params[:n])) * scale).unsqueeze(1)
                sg, sb = s * torch.stack(params[n:3 * n]).view(2, n, -1)
                if not folded:
                    return torch.stack([sg, sb]).to(dtype)
                w, b = torch.stack(params[3 * n:]).view(2, n, -1)
                return torch.stack([torch.addcmul(w, w, sg), torch.addcmul(b + sb, b, sg)]).to(dtype)

            params = [m.gate for m in members] + [m.gamma for m in members] + [m.beta for m in members]
            if folded:
                params += [m.output_norm.weight for m in members] + [m.output_norm.bias for m in members]
            return make, params, {id(m): i for i, m in enumerate(members)}

        return memo.group(("gqt", scale, folded, dtype, torch.is_grad_enabled()), build)


def _output_norm(block: nn.Module, width: int) -> nn.LayerNorm | None:
    """The LayerNorm whose output a BERT-style attention block returns (``block.output.LayerNorm``:
    BERT, BLIP's text encoder, BLIP-2's Q-Former), or None."""
    norm = getattr(getattr(block, "output", None), "LayerNorm", None)
    affine = isinstance(norm, nn.LayerNorm) and norm.weight is not None and norm.bias is not None
    return norm if affine and tuple(norm.normalized_shape) == (width,) else None


class GatedQuery(torch.autograd.Function):
    """h' = (h + sβ) + h ⊙ sγ with s = tanh(g) · λ, as one node that keeps only h (autograd's own
    ops would also keep h ⊙ γ + β, a second activation per block). Not h ⊙ (1 + sγ): in bf16,
    1 + sγ would round the small sγ away."""

    @staticmethod
    def forward(ctx, h, gamma, beta, gate, scale):
        s = torch.tanh(gate) * scale
        ctx.save_for_backward(h, gamma, beta, gate)
        ctx.scale = scale
        return torch.addcmul(h + s * beta, h, s * gamma)

    @staticmethod
    def backward(ctx, go):
        h, gamma, beta, gate = ctx.saved_tensors
        t = torch.tanh(gate)
        s = t * ctx.scale
        go2, h2 = go.reshape(-1, h.shape[-1]), h.reshape(-1, h.shape[-1])
        sum_go = go2.sum(0)
        sum_go_h = (go2 * h2).sum(0)
        dh = torch.addcmul(go, go, s * gamma)
        dgamma, dbeta = s * sum_go_h, s * sum_go
        dgate = (ctx.scale * (1 - t * t)) * (sum_go_h @ gamma + sum_go @ beta)
        return dh, dgamma, dbeta, dgate.reshape(gate.shape), None


class GatedQueryShared(torch.autograd.Function):
    """h' = (h + sβ) + h ⊙ sγ with sγ, sβ made once per call for every block (``once.Group``):
    two ops forward, four backward, the parameters' shares put into the group."""

    @staticmethod
    def forward(ctx, h, made, group, index):
        ctx.save_for_backward(h, made)
        ctx.group, ctx.index = group, index
        return torch.addcmul(h + made[1, index], h, made[0, index])

    @staticmethod
    def backward(ctx, go):
        h, made = ctx.saved_tensors
        group, index = ctx.group, ctx.index
        if group is not None:
            go2, h2 = go.reshape(-1, h.shape[-1]), h.reshape(-1, h.shape[-1])
            group.put((0, index), (go2 * h2).sum(0))
            group.put((1, index), go2.sum(0))
        return torch.addcmul(go, go, made[0, index]), None, None, None


class GatedNorm(torch.autograd.Function):
    """GQT folded into the LayerNorm that makes the block's output h: LN(x) with weight
    w' = w + w ⊙ sγ and bias b' = b + b ⊙ sγ + sβ (``made[:, index]``, made once per call for
    every block) is h + h ⊙ sγ + sβ. No op of its own: the forward is the LayerNorm's kernel, and
    the LayerNorm's backward makes the gradients of w' and b' beside x's (on a GPU a reduction
    kernel more inside that op), put into the group as they are. Keeps what the LayerNorm keeps.
    In bf16, w' rounds w + w ⊙ sγ where the hook rounds h + h ⊙ sγ + sβ: the output's error is
    the same (measured in docs/method.md)."""

    @staticmethod
    def forward(ctx, x, made, group, index, eps):
        ctx.set_materialize_grads(False)
        weight, bias = made[0, index], made[1, index]
        out, mean, rstd = torch.native_layer_norm(x, weight.shape, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, made)
        ctx.group, ctx.index = group, index
        return out

    @staticmethod
    def backward(ctx, go):
        if go is None:
            return (None,) * 5
        x, mean, rstd, made = ctx.saved_tensors
        group, index = ctx.group, ctx.index
        weight, bias = made[0, index], made[1, index]
        mask = [ctx.needs_input_grad[0], group is not None, group is not None]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(go, x, weight.shape, mean, rstd, weight, bias, mask)
        if group is not None:
            group.put((0, index), dw)
            group.put((1, index), db)
        return dx, None, None, None, None


def _apply_gqt(block: nn.Module, args, output):
    """Forward hook: route the block's (first) output through its GQT module, unless GQT was
    folded into the LayerNorm that made it.

    Calling the module (not its tensors) keeps ZeRO-3's per-module gathering in charge.
    """
    gqt = block.aurora_gqt
    h = output[0] if isinstance(output, tuple) else output
    folded, gqt.folded = gqt.folded, None
    if folded is not None:  # the same tensor, or (ZeRO-3 wraps module outputs) a detached alias of it
        if h.data_ptr() != folded.data_ptr() or h.shape != folded.shape:
            raise RuntimeError(f"GQT was folded into {type(block).__name__}'s output.LayerNorm, but the block "
                               f"does not return that LayerNorm's output")
        return None
    if isinstance(output, tuple):
        return (gqt(h), *output[1:])
    return gqt(h)


class ContextEnhancement(nn.Module):
    """ICE: f' = f + tanh(g) · λ · t̄, with t̄ the training batch's mean text [CLS] feature, or
    in evaluation ``running_context`` (part of the adapter)."""

    def __init__(self, width: int, scale: float = 0.1, momentum: float = 0.1, dtype=None, device=None):
        super().__init__()
        self.scale = scale
        self.momentum = momentum
        self.gate = nn.Parameter(torch.zeros(1, dtype=dtype, device=device))
        self.register_buffer("running_context", torch.zeros(width, dtype=torch.float32, device=device))
        self.register_buffer("batches_tracked", torch.zeros(1, dtype=torch.long, device=device))

    def _apply(self, fn, recurse=True):
        """The running context follows the model's moves but not its casts (DeepSpeed's bf16 or
        fp16): an average of small steps kept in bf16 (8 significant bits) stalls, so it stays fp32."""
        kept = self.running_context
        super()._apply(fn, recurse)
        self.running_context = kept.to(self.running_context.device)
        return self

    def forward(self, fused_cls: torch.Tensor, text_cls: torch.Tensor | None = None) -> torch.Tensor:
        """``text_cls``: (N, d) text-only [CLS] features of a training batch, whose mean is the
        context; None (evaluation): the running context."""
        context = self.running_context if text_cls is None else text_cls.mean(dim=0)
        return fused_cls + torch.tanh(self.gate) * self.scale * context.to(fused_cls.dtype)

    @torch.no_grad()
    def track(self, batch_context: torch.Tensor):
        """Fold one training batch's context (its mean text [CLS], over every rank) into the
        running one: an exponential moving average that the first batch starts (chosen on the
        device: no host read inside a training step)."""
        first = self.batches_tracked == 0
        weight = torch.where(first, torch.ones_like(first, dtype=self.running_context.dtype), self.momentum)
        self.running_context.lerp_(batch_context.to(self.running_context.dtype), weight)
        self.batches_tracked += 1

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

import torch
from torch import nn

from .once import partitioned


class GatedQueryTransform(nn.Module):
    """GQT for one attention block; attached with :meth:`attach` as a forward hook."""

    def __init__(self, width: int, scale: float = 0.1, dtype=None, device=None, memo=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.scale = scale
        self.memo = memo  # the model's once.CallMemo: sγ and sβ of every block made once per call
        if memo is not None:
            memo.register(("gqt", scale), self)
        self.gamma = nn.Parameter(torch.empty(width, **kw).normal_(0.0, 2e-4))
        self.beta = nn.Parameter(torch.empty(width, **kw).normal_(0.0, 2e-4))
        self.gate = nn.Parameter(torch.zeros(1, **kw))  # 1-d: ZeRO cannot partition 0-d tensors

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        memo = self.memo
        if memo is None or not memo.active or any(partitioned(p) for p in (self.gamma, self.beta, self.gate)):
            return GatedQuery.apply(h, self.gamma, self.beta, self.gate, self.scale)
        scale, dtype = self.scale, h.dtype

        def build():
            members = memo.members[("gqt", scale)]
            count = len(members)

            def make(*params):  # (2, blocks, d): sγ and sβ of every block
                s = (torch.tanh(torch.cat(params[:count])) * scale).unsqueeze(1)
                return torch.stack([s * torch.stack(params[count:2 * count]), s * torch.stack(params[2 * count:])]).to(dtype)

            params = [m.gate for m in members] + [m.gamma for m in members] + [m.beta for m in members]
            return make, params, {id(m): i for i, m in enumerate(members)}

        group = memo.group(("gqt", scale, dtype, torch.is_grad_enabled()), build)
        return GatedQueryShared.apply(h, group.value, group if group.trained else None, group.index[id(self)])

    def attach(self, block: nn.Module):
        """Register as ``block.aurora_gqt`` and transform the block's output on every call."""
        block.add_module("aurora_gqt", self)
        block.register_forward_hook(_apply_gqt)


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
    two ops forward, four backward, the parameters' shares written into the group's buffer."""

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
            group.add((0, index), lambda out: torch.sum(go2 * h2, 0, out=out))
            group.add((1, index), lambda out: torch.sum(go2, 0, out=out))
        return torch.addcmul(go, go, made[0, index]), None, None, None


def _apply_gqt(block: nn.Module, args, output):
    """Forward hook: route the block's (first) output through its GQT module.

    Calling the module (not its tensors) keeps ZeRO-3's per-module gathering in charge.
    """
    if isinstance(output, tuple):
        return (block.aurora_gqt(output[0]), *output[1:])
    return block.aurora_gqt(output)


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

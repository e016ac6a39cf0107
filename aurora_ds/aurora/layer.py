"""The mode-approximation update: global factors per width, coefficients per adapted weight.

Notation follows the paper. For a hidden width ``d`` there is one factor set shared by every
adapted layer of that width: ``U`` (R x d), ``V`` (d x R) and a core ``C`` (R x R x R). A weight
``W`` of shape ``(b*d) x (a*d)`` is seen as ``b x a`` blocks of ``d x d`` and owns only its
coefficients ``Λ`` (R x a*b). Column ``k = j*a + i`` of ``Λ`` belongs to block ``(j, i)``
(output block ``j``, input block ``i``), whose update is

    ΔW_ji = V · M_ijᵀ · U,      M_ij = Σ_t C[:, :, t] · Λ[t, k].

A fused qkv projection (b = 3), an MLP fc1 (b = 4) and fc2 (a = 4) all follow this one rule.

A layer whose sides are not whole multiples of one width (ViT-g's 1408 -> 6144 MLP, BLIP-2's
Q-Former cross-attention 1408 -> 768) is one block *between* two widths: U comes from the
input width's factor set, V and the core from the output width's,

    ΔW = V_out · Mᵀ · U_in,

so both ranks must be equal. ``U`` lives in a factor set's ``down`` part and ``V`` with the core
in its ``up`` part; a width that only ever feeds (or only receives) such layers has one part.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ModeDown(nn.Module):
    """u_i = U · x_i: the input blocks of width d into the rank-R mode space.

    ``dropout`` is the rate applied to u on each layer's rank-R path (by :class:`ModeUp`, so
    that layers sharing one u still draw their own masks).
    """

    def __init__(self, width: int, rank: int, dropout: float, **kw):
        super().__init__()
        self.U = nn.Parameter(torch.empty(rank, width, **kw))
        self.dropout = dropout
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., a*d) -> (..., a*R), in x's dtype (the factors are cast, never the activations)."""
        return ModeDownProjection.apply(x, self.U.to(x.dtype), *rebuild_recipe(x))


def _layer_norm(x, weight, bias, mean, rstd):
    x = (x - mean) * rstd
    x = x if weight is None else x * weight
    return x if bias is None else x + bias


def _gelu(approximate: str):
    return lambda t: torch.nn.functional.gelu(t, approximate=approximate)


def rebuild_recipe(x: torch.Tensor) -> tuple:
    """(fn, *tensors) with fn(*tensors) == x from tensors x's own producer keeps for its backward
    anyway (a LayerNorm's input and statistics, a GELU's input), or (None,) to keep x itself.

    U's gradient needs x, which the frozen linear never keeps; rebuilding it costs one
    elementwise pass in backward instead of a stored activation per layer. Not for parameters
    ZeRO-3 partitions (they may be released when this node's backward runs) or while compiling.
    """
    if torch.compiler.is_compiling():  # reading grad_fn would break the graph
        return (None,)
    node = x.grad_fn
    if node is None or x.output_nr != 0:
        return (None,)
    kind = type(node).__name__
    if kind == "GeluBackward0":
        fn, sources = _gelu(node._saved_approximate), (node._saved_self,)
    elif kind == "NativeLayerNormBackward0":
        fn = _layer_norm
        sources = (node._saved_input, node._saved_weight, node._saved_bias, node._saved_result1, node._saved_result2)
        if any(hasattr(t, "ds_id") for t in sources):
            return (None,)
    else:
        return (None,)
    # Detached: the same storage, but no graph edge to x's producer's inputs.
    return (fn, *(None if t is None else t.detach() for t in sources))


class ModeDownProjection(torch.autograd.Function):
    """u = U · x per input block, keeping x or a recipe to rebuild it (:func:`rebuild_recipe`)."""

    @staticmethod
    def forward(ctx, x, U, rebuild, *sources):
        rank, width = U.shape
        ctx.rebuild, ctx.sources = rebuild, len(sources)
        ctx.save_for_backward(U, *((x,) if rebuild is None else sources))
        return (x.reshape(-1, width) @ U.t()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, gu):
        U, *kept = ctx.saved_tensors
        rank, width = U.shape
        gu2 = gu.reshape(-1, rank)
        dx = dU = None
        if ctx.needs_input_grad[0]:
            dx = (gu2 @ U).view(*gu.shape[:-1], -1)
        if ctx.needs_input_grad[1]:
            x = kept[0] if ctx.rebuild is None else ctx.rebuild(*kept)
            dU = gu2.t() @ x.reshape(-1, width)
        return (dx, dU, None) + (None,) * ctx.sources


class ModeUp(nn.Module):
    """Δy_j = V · Σ_i M_ijᵀ · u_i: mode space back to the output blocks of width d.

    V starts at zero, so the update is exactly zero at step 0 while every factor still
    receives a gradient (V directly, U and the core through V's first step).
    """

    def __init__(self, width: int, rank: int, **kw):
        super().__init__()
        self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
        self.V = nn.Parameter(torch.zeros(width, rank, **kw))
        nn.init.xavier_uniform_(self.core)

    def mode_matrices(self, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """M[j, i] = Σ_t C[:, :, t] · Λ[t, j*a + i], shape (b, a, R, R)."""
        rank = self.core.shape[0]
        return torch.einsum("pqt,tk->kpq", self.core, coeffs.to(self.core.dtype)).reshape(b, a, rank, rank)

    def forward(self, y: torch.Tensor, u: torch.Tensor, coeffs: torch.Tensor, a: int, b: int,
                scale: float, dropout: float) -> torch.Tensor:
        """y + scale · Δ, written into y (the frozen layer's fresh output)."""
        rank = self.core.shape[0]
        # All blocks at once: row (i, p), column (j, q) of one (a*R) x (b*R) matrix, once per call.
        m = self.mode_matrices(coeffs, a, b).permute(1, 2, 0, 3).reshape(a * rank, b * rank).to(y.dtype)
        mask = None
        if dropout > 0:
            mask = torch.rand(u.shape, device=u.device) >= dropout  # rank-space sized: the draw is cheap
        return ModeUpdate.apply(y, u.to(y.dtype), m, self.V.to(y.dtype), mask, scale / (1.0 - dropout))


class ModeUpdate(torch.autograd.Function):
    """y += alpha · ((u ⊙ mask) · M) · Vᵀ as one node, in place, in y's dtype.

    alpha = s / keep folds the scale and the dropout rescaling into the V GEMM, so no
    full-width tensor is made besides y itself. Only rank-space tensors are kept (u, a boolean
    mask); (u ⊙ mask) · M is recomputed in backward, which is cheaper than keeping it.
    """

    @staticmethod
    def forward(ctx, y, u, m, V, mask, alpha):
        ar, br = m.shape
        rank = V.shape[1]
        ud = u.reshape(-1, ar) if mask is None else u.reshape(-1, ar) * mask.reshape(-1, ar)
        z = ud @ m
        ctx.save_for_backward(u, m, V, mask)
        ctx.alpha = alpha
        if torch.compiler.is_compiling():  # inductor fuses the add itself; traced in-place writes break its backward
            return torch.addmm(y.view(-1, V.shape[0]), z.view(-1, rank), V.t(), alpha=alpha).view(y.shape)
        y.view(-1, V.shape[0]).addmm_(z.view(-1, rank), V.t(), alpha=alpha)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):
        u, m, V, mask = ctx.saved_tensors
        ar, br = m.shape
        rank = V.shape[1]
        ud = u.reshape(-1, ar) if mask is None else u.reshape(-1, ar) * mask.reshape(-1, ar)
        g2 = g.reshape(-1, V.shape[0])
        gz = (g2 @ V).mul_(ctx.alpha).view(-1, br)
        du = dm = dV = None
        if ctx.needs_input_grad[1]:
            du = gz @ m.t()
            if mask is not None:
                du.mul_(mask.reshape(-1, ar))
            du = du.view(u.shape)
        if ctx.needs_input_grad[2]:
            dm = ud.t() @ gz
        if ctx.needs_input_grad[3]:
            dV = (g2.t() @ (ud @ m).view(-1, rank)).mul_(ctx.alpha)
        return g, du, dm, dV, None, None


class AuroraFactors(nn.Module):
    """The factor set of one hidden width: ``down`` (U) and/or ``up`` (core, V).

    Adapted layers *call* the parts (rather than reading their tensors) so that DeepSpeed
    ZeRO-3, which gathers a module's parameters in that module's own forward hooks, gathers
    the shared factors wherever they are used: in every adapted layer, in ``generate()``, or
    when a submodule is called on its own. The set is registered once, at the model root, so
    its parameters have one name and one optimizer entry.
    """

    def __init__(self, width: int, rank: int, dropout: float = 0.1, dtype=None, device=None,
                 parts: tuple[str, ...] = ("down", "up")):
        super().__init__()
        self.width, self.rank = width, rank
        kw = {"dtype": dtype, "device": device}
        self.down = ModeDown(width, rank, dropout, **kw) if "down" in parts else None
        self.up = ModeUp(width, rank, **kw) if "up" in parts else None

    @property
    def parts(self) -> list[str]:
        return [p for p in ("down", "up") if getattr(self, p) is not None]

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"


class AuroraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus its mode-approximation update: y = W x + b + s · Δ(x).

    ``source`` is the factor set of the input width, ``target`` that of the output width (the
    same set for a layer made of square blocks). The layer sits at the original attribute
    path, so the backbone's own code calls it unchanged.

    Three nodes per call: the frozen linear (its own module, so ZeRO-3 gathers W there), U · x
    and the rest of the update accumulated into the frozen output in place (:class:`ModeUpdate`). The frozen linear keeps no input; U · x
    keeps x once per input, for U's gradient.
    """

    def __init__(self, base: nn.Linear, source: AuroraFactors, target: AuroraFactors, scale: float = 1.0):
        super().__init__()
        if base.in_features % source.width or base.out_features % target.width:
            raise ValueError(f"layer of shape {base.out_features}x{base.in_features} is not made of "
                             f"{target.width}x{source.width} blocks")
        if source.rank != target.rank:
            raise ValueError(f"a layer from width {source.width} (rank {source.rank}) to width {target.width} "
                             f"(rank {target.rank}) needs equal ranks")
        self.base_layer = base
        self.a, self.b = base.in_features // source.width, base.out_features // target.width
        self.scale = scale
        self.merged = False
        weight = base.weight
        self.coeffs = nn.Parameter(torch.empty(target.rank, self.a * self.b, dtype=weight.dtype, device=weight.device))
        nn.init.xavier_uniform_(self.coeffs)
        # Plain attributes, not submodules: the factors are owned once, by the model root.
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "target", target)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        down = self.source.down
        u = down(x)
        dropout = down.dropout if self.training else 0.0
        return self.target.up(y, u, self.coeffs, self.a, self.b, self.scale, dropout)

    def delta_weight(self) -> torch.Tensor:
        """The full update ``(b*d_out) x (a*d_in)``, ΔW_ji = V · M_ijᵀ · U, for merging."""
        up, U = self.target.up, self.source.down.U
        m = up.mode_matrices(self.coeffs, self.a, self.b)
        delta = torch.einsum("dq,jipq,pe->jdie", up.V, m, U)
        return self.scale * delta.reshape(self.out_features, self.in_features)

    @torch.no_grad()
    def merge(self):
        if self.merged:
            raise RuntimeError("layer is already merged")
        self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        widths = f"{self.source.width}->{self.target.width}" if self.source is not self.target else self.source.width
        return f"blocks={self.b}x{self.a}, width={widths}, rank={self.target.rank}, scale={self.scale}"

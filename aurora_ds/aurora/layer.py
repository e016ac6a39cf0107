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

import itertools
import math
import weakref
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .once import CallMemo, Sink, partitioned, saved_tensor_hooks_active


class ModeDown(nn.Module):
    """u_i = U · x_i: the input blocks of width d into the rank-R mode space.

    ``dropout`` is the rate applied to u on each layer's rank-R path (by :class:`AuroraLinear`,
    so that layers sharing one u still draw their own masks).
    """

    def __init__(self, width: int, rank: int, dropout: float, **kw):
        super().__init__()
        self.U = nn.Parameter(torch.empty(rank, width, **kw))
        self.dropout = dropout
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, memo: CallMemo | None = None, sink: Sink | None = None,
                input_grad: bool = True) -> torch.Tensor:
        """(..., a*d) -> (..., a*R), in x's dtype (the factors are cast, never the activations).
        With ``memo``, U's gradient is added in place into one buffer for the step; with ``sink``,
        u's consumers add u's gradient into it instead of returning it. Without ``input_grad``, x
        gets no gradient from here (a merged layer's weight carries it)."""
        group = None
        if memo is not None and memo.active and not partitioned(self.U):
            dtype = x.dtype
            group = memo.group(("U", id(self), dtype, torch.is_grad_enabled()),
                               lambda: (lambda U: _as(U, dtype), (self.U,), {}))
        U = _as(self.U, x.dtype) if group is None else group.value
        sink_U = group if group is not None and group.trained else None
        norms = None if memo is None else memo.norms
        recipe = rebuild_recipe(x, self.U.shape[1], norms)
        return ModeDownProjection.apply(x if input_grad else x.detach(), U, sink_U, sink, *recipe)


# U's gradient is gu^T · x (gu: the gradient of u, one row per input block). Each recipe below
# rebuilds x in backward from tensors that x's producer keeps for its own backward anyway, so
# that x itself need not be kept; _kept is the fallback that keeps x.

def _kept(x):
    return x


def _layer_norm_again(eps, source, weight, bias):
    """x made again by the LayerNorm's own kernel (bit for bit what it made in forward)."""
    return F.layer_norm(source, weight.shape, weight, bias, eps)


def _from_layer_norm(source, weight, bias, mean, rstd):
    """x = (source - mean) · rstd · weight + bias, where the LayerNorm's eps is not known."""
    dtype = source.dtype
    x = (source - _as(mean, dtype)) * _as(rstd, dtype)
    if weight is None:
        return x if bias is None else x + _as(bias, dtype)
    return torch.addcmul(_as(bias, dtype), x, _as(weight, dtype)) if bias is not None else x * _as(weight, dtype)


def _rebuilt(make, ops, *sources):
    """x rebuilt by ``make(*sources)`` and the shape-only ops that led from it to x."""
    x = make(*sources)
    for op, arg in ops:
        x = getattr(x, op)(*arg)
    return x


def _identity(t):
    return t


# Autograd nodes that only move or copy values, with how to replay them forward.
_SHAPE_OPS = ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "PermuteBackward0", "TransposeBackward0", "CloneBackward0")


def _through_shape_ops(x: torch.Tensor):
    """(producer node, its output index, that output's shape, ops replaying x from it): x's
    producers followed back through views, permutes, transposes and copies."""
    node, index, shape, ops = x.grad_fn, x.output_nr, tuple(x.shape), []
    while node is not None and type(node).__name__ in _SHAPE_OPS and len(ops) < 8:
        kind = type(node).__name__
        if kind in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
            ops.append(("reshape", (shape,)))
            shape = tuple(node._saved_self_sym_sizes)
        elif kind == "PermuteBackward0":
            dims = [d % len(shape) for d in node._saved_dims]
            ops.append(("permute", (dims,)))
            inverse = [0] * len(shape)
            for k, d in enumerate(dims):
                inverse[d] = shape[k]
            shape = tuple(inverse)
        elif kind == "TransposeBackward0":
            d0, d1 = node._saved_dim0 % len(shape), node._saved_dim1 % len(shape)
            ops.append(("transpose", (d0, d1)))
            swapped = list(shape)
            swapped[d0], swapped[d1] = shape[d1], shape[d0]
            shape = tuple(swapped)
        node, index = node.next_functions[0]
    return node, index, shape, ops[::-1]


def rebuild_recipe(x: torch.Tensor, width: int, norms: dict | None = None) -> tuple:
    """(fn, *tensors) with fn(*tensors) == x, made in backward for U's gradient gu^T · x from what
    x's producer keeps for its own backward anyway where that is possible, else (_kept, ).

    The frozen linear never keeps its input; keeping it for U alone would add one activation
    per adapted layer. Producers covered: a LayerNorm (its input and statistics; run again in
    one kernel where ``norms``, {id(weight): eps} of the model's LayerNorms, knows its eps), a GELU (its
    input), attention (the probabilities and values a ``bmm`` keeps, or the output a fused
    scaled-dot-product kernel keeps), each possibly followed by views, permutes and copies.
    A product of two kept tensors is recomputed too (quick_gelu).
    Not while compiling (reading grad_fn would break the graph) or under saved-tensor hooks;
    never with a ZeRO-3 parameter that is partitioned (it may be released before this node's
    backward runs).
    """
    if torch.compiler.is_compiling() or saved_tensor_hooks_active():
        return (_kept,)
    node, index, shape, ops = _through_shape_ops(x)
    kind = type(node).__name__
    try:
        if node is None or index != 0:
            return (_kept,)
        if kind == "NativeLayerNormBackward0" and not ops and list(node._saved_normalized_shape) == [width]:
            weight = node._saved_weight
            eps = None if norms is None or weight is None else norms.get(id(weight))
            if eps is not None:
                fn = partial(_layer_norm_again, eps)
                sources = (node._saved_input, weight, node._saved_bias)
            else:
                fn = _from_layer_norm
                sources = (node._saved_input, weight, node._saved_bias, node._saved_result1, node._saved_result2)
            made = sources[0].shape
        elif kind == "GeluBackward0":
            fn = partial(_rebuilt, partial(F.gelu, approximate=node._saved_approximate), ops)
            sources = (node._saved_self,)
            made = sources[0].shape
        elif kind == "MulBackward0":  # e.g. quick_gelu's x * sigmoid(1.702 x)
            fn = partial(_rebuilt, torch.mul, ops)
            sources = (node._saved_self, node._saved_other)
            made = torch.broadcast_shapes(sources[0].shape, sources[1].shape)
        elif kind == "BmmBackward0":
            fn = partial(_rebuilt, torch.bmm, ops)
            sources = (node._saved_self, node._saved_mat2)
            made = (sources[0].shape[0], sources[0].shape[1], sources[1].shape[2])
        elif kind.startswith("ScaledDotProduct") and hasattr(node, "_saved_output"):
            fn = partial(_rebuilt, _identity, ops)
            sources = (node._saved_output,)
            made = sources[0].shape
        else:
            return (_kept,)
    except (RuntimeError, AttributeError):
        # a saved tensor that was not kept (its input needs no gradient: None or an error), already
        # freed, or named differently in this torch version
        return (_kept,)
    if tuple(made) != shape or any(t is not None and partitioned(t) for t in sources):
        return (_kept,)
    # Detached: the same storage and version counter, but no graph edge to the producer's inputs.
    return (fn, *(None if t is None else t.detach() for t in sources))


class ModeDownProjection(torch.autograd.Function):
    """u = U · x per input block, keeping only what :func:`rebuild_recipe` chose. U's gradient
    goes into ``sink_U`` (a :class:`once.Group`) in place (one GEMM) where there is one, else back through autograd;
    u's gradient comes from autograd and/or from ``sink`` (:class:`once.Sink`)."""

    @staticmethod
    def forward(ctx, x, U, sink_U, sink, rebuild, *tensors):
        ctx.set_materialize_grads(False)
        ctx.rebuild, ctx.sink_U, ctx.sink, ctx.x_shape = rebuild, sink_U, sink, x.shape
        ctx.save_for_backward(U, *(tensors or (x,)))
        return torch.mm(x.reshape(-1, U.shape[1]), U.t()).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, gu):
        U, *tensors = ctx.saved_tensors
        sink, rest = ctx.sink, (None,) * (len(ctx.needs_input_grad) - 2)
        shares = [t for t in (gu, None if sink is None else sink.grad) if t is not None]
        gathered = None if sink is None else sink.dx  # x's gradient from the consumers that also read x
        if sink is not None:
            sink.grad = sink.dx = None
        if not shares:
            return (None if gathered is None else gathered.view(ctx.x_shape), None) + rest
        shares = [t.reshape(-1, U.shape[0]) for t in shares]  # autograd's (..., a*R), a sink's 2-d
        gu2 = sum(shares[1:], shares[0])
        dU = None
        if ctx.needs_input_grad[1]:  # first: a rebuilt x is freed before the input gradient is made
            x2 = ctx.rebuild(*tensors).reshape(gu2.shape[0], -1)
            if ctx.sink_U is not None:
                ctx.sink_U.buffer().addmm_(gu2.t(), x2)
            else:
                dU = torch.mm(gu2.t(), x2)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(gu2, U) if gathered is None else gathered.view(-1, U.shape[1]).addmm_(gu2, U)
            dx = dx.view(ctx.x_shape)
        return (dx, dU) + rest


def mode_matrices(core: torch.Tensor, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """M[j, i] = Σ_t C[:, :, t] · Λ[t, j*a + i], shape (b, a, R, R): one GEMM."""
    rank = core.shape[0]
    return torch.mm(coeffs.t(), core.reshape(rank * rank, rank).t()).view(b, a, rank, rank)


def update_blocks(core: torch.Tensor, V: torch.Tensor, coeffs: list[torch.Tensor], rows: bool,
                  scale: float) -> torch.Tensor:
    """The update of every block of the layers whose coefficients are ``coeffs`` (all with
    a == 1 when ``rows``, else all with b == 1), stacked, in a few ops:

        s · ΔW_ji · x_i = Σ_p u_i[p] · T[(i, p), (j, e)],   T[(i, p), (j, e)] = s · Σ_q M_ji[p, q] · V[e, q].

    Block k (column k of the coefficients laid side by side) is T's slice for output block j
    (rows: (d, R), Tᵀ's rows (j, ·)) or for input block i ((R, d), T's rows (i, ·)), so one
    layer's T is a contiguous run of blocks, and its update one GEMM of its rank-space input.
    """
    rank, width = core.shape[0], V.shape[0]
    lam = _coefficient_rows(coeffs)
    # M_k first (mode_matrices with every block in one row): the only intermediate kept is K x R x R
    mats = mode_matrices(core, lam.t(), lam.shape[0], 1).view(-1, rank, rank)
    blocks = torch.mm(mats.view(-1, rank), V.t()).view(-1, rank, width)  # T_k[p, e] = Σ_q M_k[p, q] · V[e, q]
    if rows:
        blocks = blocks.transpose(1, 2).contiguous()
    return blocks if scale == 1.0 else blocks * scale


_ROW_INDEX: dict = {}  # (device, R, each layer's block count) -> _coefficient_rows' gather index and its inverse


def _coefficient_rows(coeffs: list[torch.Tensor]) -> torch.Tensor:
    """Λᵀ (K x R): row k holds the coefficients of block k, the layers' blocks one after another.

    Each coefficient's gradient must reach it in its own R x k layout: autograd copies any other
    layout into the parameter's, one op per layer and step. A transposed slice of Λᵀ's gradient
    is such a layout wherever k > 1, so Λᵀ is gathered by one ``index_select`` from the layers'
    flat, concatenated coefficients, Λᵀ[k, p] = Λ_l[p, k - start_l], whose gradient comes back
    flat (one ``index_select`` through the inverse index): each layer's share a contiguous run,
    viewed as R x k. One layer's Λᵀ is its Λ transposed (the GEMM reading it gives the gradient
    in Λ's layout); columns (k = 1) need no gather, their concatenation is Λᵀ. One op each way
    that the compiled code calls, too: inductor would copy each input of a concatenation of
    graph inputs by a kernel of its own, one per adapted layer.
    """
    return coeffs[0].t() if len(coeffs) == 1 else _gathered_rows(coeffs)


def _row_index(device, rank: int, widths: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(where each element of Λᵀ lies in the flat coefficients, where each flat one lies in Λᵀ)."""
    key = (device, rank, widths)
    if key not in _ROW_INDEX:
        starts = itertools.accumulate((rank * k for k in widths), initial=0)
        index = torch.tensor([start + p * k + j for start, k in zip(starts, widths) for j in range(k) for p in range(rank)],
                             device=device)
        _ROW_INDEX[key] = (index, torch.argsort(index))
    return _ROW_INDEX[key]


@torch.library.custom_op("aurora_ds::gathered_rows", mutates_args=())
def _gathered_rows(coeffs: list[torch.Tensor]) -> torch.Tensor:
    """Λᵀ gathered from the flat coefficients, as one op the compiler calls."""
    rank, flat = coeffs[0].shape[0], torch.cat([c.reshape(-1) for c in coeffs])
    widths = tuple(c.shape[1] for c in coeffs)
    if all(k == 1 for k in widths):
        return flat.view(-1, rank)
    return flat.index_select(0, _row_index(flat.device, rank, widths)[0]).view(-1, rank)


@torch.library.custom_op("aurora_ds::gathered_rows_grad", mutates_args=())
def _gathered_rows_grad(grad: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """The coefficients' flat gradient from Λᵀ's: each layer's share a contiguous run."""
    return grad.reshape(-1).index_select(0, _row_index(grad.device, grad.shape[1], tuple(widths))[1])


@_gathered_rows.register_fake
def _(coeffs):
    return coeffs[0].new_empty(sum(c.shape[1] for c in coeffs), coeffs[0].shape[0])


@_gathered_rows_grad.register_fake
def _(grad, widths):
    return grad.new_empty(grad.numel())


def _gathered_rows_setup(ctx, inputs, output):
    ctx.widths = [c.shape[1] for c in inputs[0]]
    ctx.columns = all(k == 1 for k in ctx.widths)  # no gather was made: none to undo


def _gathered_rows_backward(ctx, grad):
    rank, widths = grad.shape[1], ctx.widths
    flat = grad.reshape(-1) if ctx.columns else _gathered_rows_grad(grad, widths)
    return [run.view(rank, k) for run, k in zip(flat.split([rank * k for k in widths]), widths)]


_gathered_rows.register_autograd(_gathered_rows_backward, setup_context=_gathered_rows_setup)


def layer_update(core: torch.Tensor, V: torch.Tensor, coeffs: torch.Tensor, a: int, b: int,
                 scale: float) -> torch.Tensor:
    """One layer's blocks (:func:`update_blocks`), or for a layer with a > 1 and b > 1, its
    (a*R) x (b*d) matrix T as a stack of one."""
    if a == 1 or b == 1:
        return update_blocks(core, V, [coeffs], a == 1, scale)
    rank, width = core.shape[0], V.shape[0]
    blocks = update_blocks(core, V, [coeffs], False, scale).view(b, a, rank, width)  # block k = j*a + i
    return blocks.permute(1, 2, 0, 3).reshape(1, a * rank, b * width)


def _stored(blocks: torch.Tensor, a: int, rank: int) -> torch.Tensor:
    """A layer's run of blocks as one matrix in its stored orientation: Tᵀ when a == 1, else T."""
    return blocks.reshape(-1, rank) if a == 1 else blocks.reshape(a * rank, -1)


def _gemm_factor(blocks: torch.Tensor, a: int, rank: int) -> torch.Tensor:
    """A layer's run of blocks as the (a*R) x (b*d) right factor of its update GEMM (a view)."""
    stored = _stored(blocks, a, rank)
    return stored.t() if a == 1 else stored


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

    def forward(self, y: torch.Tensor, u: torch.Tensor, layer: "AuroraLinear", dropout: float = 0.0,
                sink: Sink | None = None) -> torch.Tensor:
        """y + Δ for ``layer`` from its rank-space input ``u`` (dropped out at rate ``dropout``
        here), written into y (the frozen layer's fresh output) where autograd allows; u's
        gradient goes into ``sink`` if given. The update matrices come from the call's memo
        (made once for all layers like this one), else are made here for this layer alone (where
        ZeRO-3 has just gathered the core and V)."""
        run = None if layer.sharing is None else layer.sharing.blocks(layer, y.dtype)
        if run is None:
            blocks = _as(layer_update(self.core, self.V, layer.coeffs, layer.a, layer.b, layer.scale), y.dtype)
            run = Run(blocks, layer.a, self.core.shape[0])
        return ModeUpdate.apply(y, u, run.T, run, dropout, sink)


class Run:
    """One layer's run of stacked update blocks: its GEMM factor T (a view, made at its first
    use: layers read together use their joint run's) and, for blocks made once per step, the
    view of the group's gradient buffer its backward adds into."""

    __slots__ = ("blocks", "a", "rows", "group", "span", "rank", "_T", "_grad")

    def __init__(self, blocks: torch.Tensor, a: int, rank: int, group=None, span=None):
        self.a, self.rows, self.rank, self.group, self.span = a, a == 1, rank, group, span
        self.blocks, self._T, self._grad = blocks, None, None

    @property
    def T(self) -> torch.Tensor:
        if self._T is None:
            span = self.span
            self._T = _gemm_factor(self.blocks if span is None else self.blocks[span[0]:span[1]], self.a, self.rank)
        return self._T

    def grad(self) -> torch.Tensor:
        """dT's share in T's stored orientation (:func:`_stored`), within the group's buffer."""
        if self._grad is None:
            start, stop = self.span
            self._grad = _stored(self.group.buffer()[start:stop], self.a, self.rank)
        return self._grad


class ModeUpdate(torch.autograd.Function):
    """y += dropout(u) · T as one node, in place where possible, in y's dtype; T is a layer's
    :class:`Run` of update blocks.

    Only rank-space tensors are kept: ud (u itself with dropout 0) and the boolean mask of kept
    entries (T is a view of blocks that live for the step anyway). T's gradient goes into the
    run's share of its group's buffer in place (one GEMM), or, without a group, back through
    autograd; so does u's, into ``sink``.
    """

    @staticmethod
    def forward(ctx, y, u, T, run, dropout, sink):
        width = y.shape[-1]
        ud, kept = torch.native_dropout(u, dropout, True) if dropout > 0 else (u, None)
        ud2 = ud.reshape(-1, T.shape[0])
        ctx.save_for_backward(ud2, kept, T)
        ctx.run, ctx.keep, ctx.sink, ctx.u_shape = run, 1.0 - dropout, sink, u.shape
        if torch.compiler.is_compiling() or y._is_view():
            # inductor fuses the add itself (traced in-place writes break its backward); writing into
            # a view would make autograd copy the whole gradient in backward (CopySlices)
            return torch.addmm(y.reshape(-1, width), ud2, T).view(y.shape)
        y.view(-1, width).addmm_(ud2, T)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):
        ud2, kept, T = ctx.saved_tensors
        du, dT = _rank_space_grads(ctx, g.reshape(-1, T.shape[1]), ud2, kept, T, *ctx.needs_input_grad[1:3])
        return g, du, dT, None, None, None


def _rank_space_grads(ctx, g2, ud2, kept, T, needs_u, needs_T):
    """(du, dT) of y += dropout(u) · T from y's gradient: du = g · Tᵀ (masked where ``kept``),
    added into ``ctx.sink`` where there is one; dT = udᵀ · g, added into the run's share of its
    group's buffer where there is one. ``ctx`` holds ``run``, ``sink``, ``keep`` and ``u_shape``."""
    run, sink = ctx.run, ctx.sink
    du = None
    if needs_u:
        shared = sink is not None and sink.grad is not None
        if kept is None and shared:
            sink.grad.addmm_(g2, T.t())
        else:
            du = torch.mm(g2, T.t())
            if kept is not None and shared:
                sink.grad.addcmul_(du, kept.view(du.shape), value=1.0 / ctx.keep)
            elif kept is not None:
                du = torch.ops.aten.native_dropout_backward(du, kept.view(du.shape), 1.0 / ctx.keep)
            if sink is not None:
                sink.grad, du = sink.grad if shared else du, None
            else:
                du = du.view(ctx.u_shape)
    dT = None
    if needs_T or run.group is not None:  # dT = ud2ᵀ · g2, computed in T's stored orientation
        left, right = (g2.t(), ud2) if run.rows else (ud2.t(), g2)
        if run.group is not None:
            run.grad().addmm_(left, right)
        else:
            dT = torch.mm(left, right)
            dT = dT.t() if run.rows else dT
    return du, dT


def _by_layer(T: torch.Tensor, k: int) -> torch.Tensor:
    """The R x (k*d) update factor of k layers of width d as k factors R x d (a view)."""
    return T.view(T.shape[0], k, -1).transpose(0, 1)


def _batched_rank_space_grads(ctx, g2, ud, kept, T, needs_u):
    """:func:`_rank_space_grads` for k layers of one width with their own masks (``ud``, ``kept``:
    k x rows x R) in one call: du = Σ_i dropout_i(g_i · T_iᵀ) (three ops, into ``ctx.sink`` where
    there is one) and dT_i = ud_iᵀ · g_i into the run's share of the group's buffer (one op)."""
    k, run, sink = ud.shape[0], ctx.run, ctx.sink
    g3 = g2.view(g2.shape[0], k, -1).transpose(0, 1)
    du = None
    if needs_u:
        du = torch.ops.aten.native_dropout_backward(torch.bmm(g3, _by_layer(T, k).transpose(1, 2)), kept,
                                                   1.0 / ctx.keep).sum(0)
        if sink is not None:
            sink.grad, du = du if sink.grad is None else sink.grad.add_(du), None
        else:
            du = du.view(ctx.u_shape)
    if run.group is not None:
        run.grad().view(k, -1, ud.shape[2]).baddbmm_(g3.transpose(1, 2), ud)
    return du


class MergedLinear(torch.autograd.Function):
    """y = W' x + b through the merged weight W' = W + s·ΔW (made once per step for every layer
    of a kind, :meth:`InputSharing.merged_weight`), exact where the rank path has no dropout.

    The forward and x's gradient (g · W') are the frozen linear's own two GEMMs; the factors'
    gradients come from the rank space alone, as in :class:`ModeUpdate`: dT = uᵀ · g into the
    run's share of its group's buffer, du = g · Tᵀ into ``sink`` (U's gradient duᵀ · x is then
    made by u's :class:`ModeDownProjection`, which gives x nothing). Kept: u, W' and T, which live
    for the step anyway."""

    @staticmethod
    def forward(ctx, x, weight, bias, u, T, run, sink):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(weight, u.reshape(-1, T.shape[0]), T)
        ctx.run, ctx.sink, ctx.keep, ctx.u_shape = run, sink, 1.0, u.shape
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        weight, u2, T = ctx.saved_tensors
        if g is None:
            return (None,) * 7
        dx = g.matmul(weight) if ctx.needs_input_grad[0] else None
        g2 = g.reshape(-1, T.shape[1])
        dbias = g2.sum(0) if ctx.needs_input_grad[2] else None
        du, dT = _rank_space_grads(ctx, g2, u2, None, T, *ctx.needs_input_grad[3:5])
        return dx, None, dbias, du, dT, None, None


class ReadTogether(torch.autograd.Function):
    """y_i = W_i x + b_i + dropout_i(u) · T_i for layers that read one x (:meth:`InputSharing.linear`),
    side by side in one output: one GEMM through their frozen weights, which live one layer's
    rows after another in one tensor (:meth:`InputSharing._side_by_side`), then each layer's
    update written into its columns, as :class:`ModeUpdate` does; also one layer alone (fc2's
    blocks by input too), one node where the frozen linear and the update would be two. Each
    layer has its own mask.
    Layers of one width called in the order their blocks lie (``batched``) draw theirs as one
    draw of k masks (the i-th for the i-th called), and their updates and gradients are batched
    GEMMs: per call two ops forward and four or five backward, where the layers one at a time
    take two and three each. Otherwise each draws its own, in the order of the calls
    (``draws``: indices into ``runs``; nothing runs between them), so the masks are those of the
    layers run alone.
    Without dropout the updates are one GEMM (u · T of the run of blocks), as are u's and T's
    gradients. x's gradient g · W goes into
    u's ``sink`` (``dx``), where u's producer adds its own share g_u · U in place: autograd would
    add the two branches. The output is 2-d (rows x the layers' widths), viewed by the caller."""

    @staticmethod
    def forward(ctx, x, u, weight, bias, T, run, runs, draws, batched, dropout, sink):
        ctx.set_materialize_grads(False)
        x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, T.shape[0])
        y = F.linear(x2, weight, bias)
        k, width = len(runs), y.shape[1] // len(runs)
        ctx.batched = batched and dropout > 0
        if dropout == 0:
            y.addmm_(u2, T)
            saved = [u2]
        elif ctx.batched:  # y_i += ud_i · T_i for the k layers at once, in y's columns
            ud, kept = torch.native_dropout(u2.expand(k, *u2.shape), dropout, True)
            y.view(-1, k, width).transpose(0, 1).baddbmm_(ud, _by_layer(T, k))
            saved = [ud, kept]
        else:
            masks = dict(zip(draws, (torch.native_dropout(u2, dropout, True) for _ in draws)))
            saved, col = [], 0
            for i, r in enumerate(runs):
                ud, kept = masks[i]
                y[:, col:col + r.T.shape[1]].addmm_(ud, r.T)
                saved += [ud, kept]
                col += r.T.shape[1]
        ctx.save_for_backward(T, weight, *saved)
        ctx.run, ctx.runs, ctx.sink, ctx.keep, ctx.u_shape, ctx.x_shape = run, runs, sink, 1.0 - dropout, u.shape, x.shape
        return y

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return (None,) * 11
        T, weight, *saved = ctx.saved_tensors
        g2 = g.reshape(-1, T.shape[1])
        dx, sink = None, ctx.sink
        if ctx.needs_input_grad[0] and sink is None:
            dx = g2.mm(weight).view(ctx.x_shape)
        elif ctx.needs_input_grad[0]:  # u's producer returns it with its own share added
            sink.dx = g2.mm(weight) if sink.dx is None else sink.dx.addmm_(g2, weight)
        if len(saved) == 1:  # no dropout: the run of blocks at once
            du, _ = _rank_space_grads(ctx, g2, saved[0], None, T, ctx.needs_input_grad[1], False)
        elif ctx.batched:
            du = _batched_rank_space_grads(ctx, g2, *saved, T, ctx.needs_input_grad[1])
        else:  # each layer's own mask: its columns of g with its run (u's gradient goes into the sink)
            shares, col, run = [], 0, ctx.run
            for r, ud, kept in zip(ctx.runs, saved[0::2], saved[1::2]):
                ctx.run = r
                share, _ = _rank_space_grads(ctx, g2[:, col:col + r.T.shape[1]], ud, kept, r.T, ctx.needs_input_grad[1], False)
                shares += [] if share is None else [share]
                col += r.T.shape[1]
            ctx.run = run
            du = sum(shares[1:], shares[0]) if shares else None
        return (dx, du) + (None,) * 9


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without a dispatcher call when nothing changes (it runs several times per layer)."""
    return t if t.dtype == dtype else t.to(dtype)


class InputSharing(CallMemo):
    """What the adapted layers share within one call of the adapted model: one U · x per input
    tensor and factor set, and one set of update matrices per group of layers.

    BERT's q, k and v read one hidden state; BLIP's cross-attention keys and values in every
    layer read the same image tokens. Layers that read the same tensor through the same factor
    set share one u (each still draws its own dropout mask). A u entry serves only the very same
    live tensor object at the same version under the same grad mode. Layers with the same
    factors, block shape and scale get their update matrices from one batched computation at
    the first call of any of them (:class:`once.Group`), instead of a few ops per call; made per
    layer instead where ZeRO-3 partitions the factors (they are gathered only inside their own
    modules' calls).
    """

    merging = "auto"  # AuroraConfig.merged

    def __init__(self):
        super().__init__()
        self.reading = None  # (x, its version, the layers of one kind that read it one after another)
        self.readers = {}  # id(layer) -> the layers that read one x with it in the previous call
        self.laid_out = {}  # (weight or bias, ids of layers read together) -> their tensors in one
        self.used = set()  # ids of layers whose frozen tensors autograd may keep until a backward to come
        self.plans = {}  # layers in the order they read one x -> how they run together (_Together), or None

    def _open(self, module, args):
        super()._open(module, args)
        if self.owner is module and not self.kept:  # no backward to come: nothing keeps them
            self.used.clear()

    def _close(self, module, args, output):
        super()._close(module, args, output)
        if self.owner is None and self.reading:  # a run of readers ends with the call
            self._settle(self.reading[2])
            self.reading = None

    def down(self, down: ModeDown, x: torch.Tensor, input_grad: bool = True,
             layer: "AuroraLinear | None" = None) -> tuple[torch.Tensor, Sink | None]:
        """(``down(x)``, or the u it already gave for this very x in this call; the sink its
        consumers add u's gradient into, or None). While compiling, see :meth:`_traced_down`."""
        if torch.compiler.is_compiling() and self.traced_owner is not None:
            return self._traced_down(down, x, input_grad, layer), None
        if not self.active or x.is_inference():
            return down(x, input_grad=input_grad), None
        key = (id(down), id(x), input_grad)
        entry = self.memo.get(key)
        grad = torch.is_grad_enabled()
        if entry is not None and entry[0]() is x and entry[1:3] == (x._version, grad):
            return entry[3]
        sink = Sink() if grad else None
        u = down(x, self, sink, input_grad)
        memo = self.memo
        self.memo[key] = (weakref.ref(x, lambda _: memo.pop(key, None)), x._version, grad, (u, sink))
        return u, sink

    def _traced_down(self, down: ModeDown, x: torch.Tensor, input_grad: bool, layer) -> torch.Tensor:
        """U·x traced once for the layers that read one x one after another in the eager call
        before (their readers), so that its backward is one duᵀ·x and one du·U for them all
        (autograd adds their du first). Only there: a traced graph cannot read version counters,
        so it would not see x changed in place between two reads, which the eager call that
        learnt the readers ruled out (a reader follows only at x's same version)."""
        readers = None if layer is None else self.readers.get(id(layer))
        first = None if readers is None else readers[0]  # a layer is in one set of readers at a time
        u = self._traced_again("u", first, down, input_grad, x)
        if u is None:
            u = down(x, input_grad=input_grad)
            self.traced["u"] = (first, (down, input_grad, x), u)
        return u

    def _traced_again(self, name: str, first, *inputs):
        """What the previous traced call of ``name`` made, where the same readers (led by ``first``)
        asked it of the very same inputs, else None."""
        last = self.traced.get(name)  # (first of the readers, inputs, what was made)
        if first is None or last is None or last[0] is not first:
            return None
        return last[2] if all(a is b for a, b in zip(last[1], inputs)) else None

    def blocks(self, layer: "AuroraLinear", dtype: torch.dtype) -> "Run | None":
        """The layer's :class:`Run` of the update blocks made once per step for every layer of its
        kind (:func:`_kind`), or None where they must be made per layer."""
        if torch.compiler.is_compiling() and self.traced_owner is not None:
            made = self._traced_stack(layer, dtype)
            return None if made is None else Run(made[0], layer.a, layer.target.up.core.shape[0], None, made[1][id(layer)])
        group = self.stack(layer, dtype)
        return None if group is None else self._run(group, layer)

    def _traced_stack(self, layer: "AuroraLinear", dtype: torch.dtype) -> "tuple | None":
        """While compiling: (the update blocks of ``layer``'s kind, each layer's span), made once
        per traced call (their slices' gradients are the compiler's to add), or None where the
        blocks are made per layer."""
        if not self._stacked(layer):
            return None
        key = (layer.kind, dtype, torch.is_grad_enabled())
        if key not in self.traced:
            make, inputs, index = self._build(layer, dtype)
            self.traced[key] = (make(*inputs), index)
        return self.traced[key]

    def _traced_together(self, layer: "AuroraLinear", x: torch.Tensor, dropout: float) -> torch.Tensor | None:
        """While compiling, :class:`ReadTogether`'s computation in plain ops for the readers eager
        calls learnt (:meth:`_traced_down` says why only those): at the first of them, one
        GEMM through their frozen weights as laid out side by side, their updates in one GEMM
        (without dropout) or one batched GEMM over one draw of k masks; the others take their
        slice. The weights are taken as the eager calls laid them out (a graph cannot check a
        tensor's storage; the model is not moved after them). None where the readers cannot run
        so (their weights not laid out by those calls, masks not one draw): ``layer`` runs alone."""
        readers = self.readers.get(id(layer))
        outs = None if readers is None else self._traced_again("together", readers[0], x)  # {id(layer): slice}
        if outs is not None and id(layer) in outs:
            return outs.pop(id(layer))
        plan = None if readers is None else self.plans.get(readers)
        if plan is None or (dropout > 0 and not plan.batched):
            return None
        weight, bias = self.laid_out.get(("weight", *plan.ids)), self.laid_out.get(("bias", *plan.ids))
        made = self._traced_stack(layer, x.dtype)
        if weight is None or made is None or weight.dtype != x.dtype or torch.is_autocast_enabled(x.device.type):
            return None
        first = plan.layers[0]
        T = Run(made[0], 1, first.target.up.core.shape[0], None, plan.span).T
        u = self._traced_down(first.source.down, x, True, first)
        x2, u2 = x.reshape(-1, x.shape[-1]), u.reshape(-1, T.shape[0])
        y = F.linear(x2, weight, bias)
        k, width = len(plan.layers), plan.widths[0]
        if dropout == 0:
            outs = torch.addmm(y, u2, T).split(plan.widths, -1)
        else:
            ud = F.dropout(u2.expand(k, *u2.shape), dropout)
            outs = torch.baddbmm(y.view(-1, k, width).transpose(0, 1), ud, _by_layer(T, k)).unbind(0)
        outs = {i: out.view(*x.shape[:-1], out.shape[-1]) for i, out in zip(plan.ids, outs)}
        self.traced["together"] = (readers[0], (x,), outs)
        return outs.pop(id(layer))

    def stack(self, layer: "AuroraLinear", dtype: torch.dtype) -> "Group | None":
        """The group of update blocks of ``layer``'s kind in this step (eager), or None where they
        must be made per layer. Looked up once per call and passed on: on a GPU a call's Python
        is what it costs."""
        return self._group(layer, dtype) if self.active and self._stacked(layer) else None

    def _stacked(self, layer: "AuroraLinear") -> bool:
        up = layer.target.up
        return layer.kind in self.members and not any(partitioned(t) for t in (up.core, up.V, layer.coeffs))

    def _group(self, layer: "AuroraLinear", dtype: torch.dtype):
        return self.group(("blocks", layer.kind, dtype, torch.is_grad_enabled()), partial(self._build, layer, dtype))

    def _build(self, layer: "AuroraLinear", dtype: torch.dtype):
        """(make, inputs, index) of the group of update blocks of every layer of ``layer``'s kind."""
        layers, up = self.members[layer.kind], layer.target.up

        def make(core, V, *coeffs):
            return _as(update_blocks(core, V, list(coeffs), layer.a == 1, layer.scale), dtype)

        return make, (up.core, up.V, *(m.coeffs for m in layers)), self._spans(layer.kind)

    def _spans(self, kind) -> dict:
        """{id(layer): (start, stop)}: each layer's run of blocks in its kind's stack."""
        layers = self.members[kind]
        starts = itertools.accumulate((m.a * m.b for m in layers), initial=0)
        return {id(m): (start, start + m.a * m.b) for m, start in zip(layers, starts)}

    @staticmethod
    def _run(group, layer: "AuroraLinear") -> "Run":
        run = group.index[id(layer)]
        if not isinstance(run, Run):  # the layer's first call in this group: its views, made once
            run = group.index[id(layer)] = Run(group.value, layer.a, layer.target.up.core.shape[0],
                                                group if group.trained else None, run)
        return run

    def merged_weight(self, layer: "AuroraLinear", x: torch.Tensor, group) -> "tuple[torch.Tensor, Run] | None":
        """(W' = W + s·ΔW, the layer's :class:`Run`) where the layer runs merged (the caller has
        checked that its rank path has no dropout), else None. ``group``: :meth:`stack`'s.

        W' is made for every layer of the kind at its first use in a step, from the kind's stacked
        update blocks: ΔW = V · M_ijᵀ · U per block is U's rows mixed by T, so one GEMM of the
        stack with U gives every block in W's layout (for blocks by input, a > 1, after one copy
        of the stack ordered as W's rows), and one ``_foreach_add_`` adds the frozen weights into
        it in place; F.linear then reads W' as it reads W. It
        lives as long as the stack (until the step's backward), remade if U changed in place.

        ``merged: auto`` merges a kind where the rows of the call that first uses it (tokens x
        batch) are at least ``MERGE_ROWS`` · in·out / (in + out) of that layer: there W' (in·out)
        is at most 1/16 of the layer's input and output activations, so the copy stays within a
        few percent of the step's memory (which keeps several activations per layer), and its
        making is small beside the rank-space GEMMs it saves (BLIP-base's vision layers from
        batch 47–50 at 224 px, 16–17 at BLIP's 384 px; its text layers not at BLIP's batches);
        ``on`` merges whatever the rows. Not under ZeRO-3 (W, partitioned or persistent, is used only
        through its own module's call: the unmerged path, or an error for ``merged: on``), nor
        under autocast.
        """
        if self.merging == "off":
            return None
        weight = layer.base_layer.weight
        if hasattr(weight, "ds_id"):  # ZeRO-3: even a persistent (small, never partitioned) weight
            # must be used through its module's call, whose hooks every rank runs in the same order:
            # a rank merging where another does not (rows differ per rank) would desynchronise the gathers
            if self.merging == "on":
                raise RuntimeError("aurora.merged 'on': ZeRO-3 manages the frozen weights, which are whole only "
                                   "inside their own layer's call; use merged 'auto' (unmerged there) or 'off'")
            return None
        if (torch.compiler.is_compiling() or weight.requires_grad or weight.dtype != x.dtype
                or torch.is_autocast_enabled(x.device.type)):
            return None
        if group is None:
            return None
        U = layer.source.down.U
        if group.merged is None or group.merged.version != U._version:
            rows, cols = x.numel() // x.shape[-1], layer.in_features * layer.out_features
            cheaper = rows * (layer.in_features + layer.out_features) >= MERGE_ROWS * cols
            group.merged = self._merge(group, layer, U) if self.merging == "on" or cheaper else Merged(U._version)
        return None if group.merged.rows is None else (group.merged.weights[id(layer)], self._run(group, layer))

    def _merge(self, group, layer: "AuroraLinear", U: torch.Tensor) -> "Merged":
        """W + s·ΔW of every layer of ``layer``'s kind, from its group's stack, in one tensor."""
        layers, stack = self.members[layer.kind], group.value
        rank, width = U.shape[0], layer.target.width
        with torch.no_grad():
            U = _as(U, stack.dtype)
            if layer.a == 1:  # stack (K, d_out, R): ΔW's rows, b blocks of d_out per layer
                delta = torch.mm(stack.view(-1, rank), U)
            else:  # stack (K, R, d_out), a blocks by input per layer: ΔW[o, (i, e)] = Σ_p T_i[p, o] · U[p, e]
                a = layer.a
                rows = stack.view(-1, a, rank, width).permute(0, 3, 1, 2).reshape(-1, rank)  # (l, o, i) x p
                delta = torch.mm(rows, U).view(-1, a * U.shape[1])
            merged = Merged(U._version, delta, layers)
            torch._foreach_add_(list(merged.weights.values()), [m.base_layer.weight for m in layers])
        return merged

    def linear(self, layer: "AuroraLinear", x: torch.Tensor, dropout: float) -> torch.Tensor | None:
        """``layer``'s output where it runs merged (:meth:`merged_weight`, only without dropout)
        or together with the layers that read x with it, else None (the caller runs it alone).

        Layers of one kind that read this very x one after another in the model's previous call
        (BERT's query, key and value; a cross-attention's key and value) run as one at the first
        call of any of them, and the others take their slice of its output (looked up before
        anything else: on a GPU a call's Python is what it costs). Their blocks are consecutive
        in their kind's stack, so one GEMM each for T's and u's gradients serves them all
        without dropout; merged, their W' are consecutive rows of one tensor; unmerged, their
        frozen weights are rows of one tensor (:class:`ReadTogether`). Learned from
        the calls rather than declared per backbone; a layer called with another x than its
        readers' runs alone, its frozen linear and update one node all the same (unmerged).
        While compiling, :meth:`_traced_together`."""
        if torch.compiler.is_compiling() and self.traced_owner is not None:
            return self._traced_together(layer, x, dropout)
        if not self.active:
            return None
        readers, grad = self._note_reader(layer, x), torch.is_grad_enabled()
        key = None if readers is None else (readers, id(x))
        if key is not None:
            entry = self.memo.get(key)
            if entry is not None and entry[0]() is x and entry[1] == (x._version, grad) and entry[2]:
                y = entry[2].pop(id(layer), None)  # taken out: the memo must not keep the output alive
                if y is not None:
                    return y
        group = self.stack(layer, x.dtype)
        merged = None if dropout > 0 or self.merging == "off" else self.merged_weight(layer, x, group)
        if key is not None and key not in self.memo:
            together = self._read_together(readers, x, merged is not None, dropout, group)
            self.memo[key] = (weakref.ref(x), (x._version, grad), together)
            if together is not None:
                return together.pop(id(layer))
        if merged is None:  # alone: the frozen linear and the update as one node
            alone = self._read_together((layer,), x, False, dropout, group)
            if alone is not None:
                return alone[id(layer)]
        if grad:
            self.used.add(id(layer))
        return None if merged is None else self._merged_call(layer.source.down, x, *merged, layer.bias)

    def _merged_call(self, down: ModeDown, x, weight, run: "Run", bias) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(x, weight, bias)
        u, sink = self.down(down, x, input_grad=False)
        return MergedLinear.apply(x, weight, bias, u, run.T, run, sink)

    def _note_reader(self, layer: "AuroraLinear", x: torch.Tensor) -> "tuple | None":
        """Record that ``layer`` reads x now; return the layers that read one x with it last time."""
        run = self.reading
        if run and run[0]() is x and run[1] == x._version and run[2][0].kind == layer.kind and layer not in run[2]:
            run[2].append(layer)
        else:
            if run:
                self._settle(run[2])
            self.reading = (weakref.ref(x), x._version, [layer])
        return self.readers.get(id(layer))

    def _settle(self, layers: list):
        for m in layers:
            if len(layers) > 1:
                self.readers[id(m)] = tuple(layers)
            else:
                self.readers.pop(id(m), None)

    def _read_together(self, layers: tuple, x: torch.Tensor, merged: bool, dropout: float, group) -> dict | None:
        """{id(layer): its slice of one call for all ``layers``} (one layer: its output), or None
        where they cannot run as one: several with blocks by input (a > 1: their runs of blocks
        make no one GEMM factor), blocks not consecutive, frozen weights that ZeRO-3 manages
        (used only through their own modules' calls) or that train, factors that make no
        gradient (their blocks have no group buffer), or tensors to be moved into one while a
        backward to come may keep them. ``group``: the kind's (:meth:`stack`), None where its
        blocks are made per layer."""
        if any(w.requires_grad or w.dtype != x.dtype or hasattr(w, "ds_id") for w in (m.weight for m in layers)):
            return None
        if group is None or not (merged or group.trained or not torch.is_grad_enabled()):
            return None
        if not merged and torch.is_autocast_enabled(x.device.type):
            return None
        plan = self._plan(layers)
        if plan is None:
            return None
        layers, first = plan.layers, plan.layers[0]
        placed = {n: self._in_place(layers, n) for n in (("bias",) if merged else ("weight", "bias"))}
        if not all(placed.values()) and torch.is_grad_enabled() and any(i in self.used for i in plan.ids):
            return None  # moved now, their present tensors would live on beside the new one until that backward
        runs = [self._run(group, m) for m in layers]
        run = runs[0] if len(runs) == 1 else Run(group.value, 1, first.target.up.core.shape[0],
                                                 group if group.trained else None, plan.span)
        bias = self._side_by_side(layers, "bias", placed["bias"])
        if merged:
            made = group.merged
            y = self._merged_call(first.source.down, x, made.rows.narrow(0, made.starts[id(first)], sum(plan.widths)),
                                  run, bias)
        else:
            u, sink = self.down(first.source.down, x)
            weight = self._side_by_side(layers, "weight", placed["weight"])
            y = ReadTogether.apply(x, u, weight, bias, run.T, run, runs, plan.draws, plan.batched, dropout,
                                   sink).view(*x.shape[:-1], -1)
        if torch.is_grad_enabled():
            self.used.update(plan.ids)
        if len(layers) == 1:
            return {id(first): y}
        return dict(zip(plan.ids, y.split(plan.widths, -1)))

    def _plan(self, calls: tuple) -> "_Together | None":
        """How the layers ``calls`` (in the order they were called) run together, worked out at
        their first call together (it depends on the layers alone), or None where they cannot:
        several with blocks by input (a > 1: their runs of blocks make no one GEMM factor), or
        blocks not consecutive in their kind's stack."""
        if calls in self.plans:
            return self.plans[calls]
        plan = None
        if calls[0].a == 1 or len(calls) == 1:
            spans = self._spans(calls[0].kind)
            layers = sorted(calls, key=lambda m: spans[id(m)])  # as their blocks lie
            if all(spans[id(m)][1] == spans[id(n)][0] for m, n in zip(layers, layers[1:])):
                plan = _Together(layers, calls, (spans[id(layers[0])][0], spans[id(layers[-1])][1]))
        self.plans[calls] = plan
        return plan

    def _side_by_side(self, layers: list, name: str, in_place: bool) -> torch.Tensor | None:
        """The layers' frozen ``weight``s (or ``bias``es, zeros for a layer without one; None if none
        has one) in one tensor, one layer's rows after another, read by one GEMM (or add) with no
        copy per call: at the first such call each tensor moves into it (the parameter, same
        object, becomes a view of its rows, so the model's memory does not grow). Laid out again
        where a tensor is no longer in its place (the model moved to another device or dtype).
        Moved only where no backward to come keeps the present tensors (:meth:`_read_together`),
        which has checked whether they are ``in_place`` (:meth:`_in_place`)."""
        if len(layers) == 1:
            return getattr(layers[0], name)
        key = (name, *map(id, layers))
        if in_place:
            return self.laid_out.get(key)  # None: none of the layers has one
        tensors = [getattr(m, name) for m in layers]
        with torch.no_grad():
            kept = torch.cat([m.weight.new_zeros(m.out_features) if t is None else t for m, t in zip(layers, tensors)])
            for t, rows in zip(tensors, kept.split([m.out_features for m in layers])):
                if t is not None:
                    t.data = rows
        ids = set(map(id, layers))  # a layout these layers had before (another group, device or dtype) is gone
        for old in [k for k in self.laid_out if k[0] == name and ids.intersection(k[1:])]:
            del self.laid_out[old]
        self.laid_out[key] = kept
        return kept

    def _in_place(self, layers: list, name: str) -> bool:
        """Whether the layers' ``name`` tensors (each may be None) are their rows of the one tensor
        laid out for them, one layer's after another."""
        kept = self.laid_out.get((name, *map(id, layers)))
        if kept is None:
            return len(layers) == 1 or all(getattr(m, name) is None for m in layers)
        start, row = kept.data_ptr(), kept.stride(0) * kept.element_size()
        for m in layers:
            t = getattr(m, name)
            if t is not None and (t.data_ptr() != start or t.dtype != kept.dtype or t.device != kept.device):
                return False
            start += m.out_features * row
        return True


class _Together:
    """Layers that read one x, as they run together (:meth:`InputSharing._read_together`):
    ``layers`` in the order their blocks lie in their kind's stack, their joint ``span`` of
    blocks, ``draws`` (for each call in call order, its layer's index in ``layers``) and
    ``batched``: several of one width called in that order, whose masks are one draw of k."""

    __slots__ = ("layers", "ids", "widths", "span", "draws", "batched")

    def __init__(self, layers: list, calls: tuple, span: tuple):
        self.layers, self.ids, self.span = layers, [id(m) for m in layers], span
        self.widths = [m.out_features for m in layers]
        self.draws = [layers.index(m) for m in calls]
        self.batched = len(layers) > 1 and self.draws == list(range(len(layers))) and len(set(self.widths)) == 1


MERGE_ROWS = 16  # merged: auto merges where the rows are this many times in·out / (in + out)


class Merged:
    """A kind's merged weights for one step: ``rows`` (every layer's W' + s·ΔW, one layer's rows
    after another; None where the kind is not merged) and each layer's view of it."""

    __slots__ = ("version", "rows", "starts", "weights")

    def __init__(self, version: int, rows: torch.Tensor | None = None, layers=()):
        self.version, self.rows = version, rows
        self.starts = dict(zip(map(id, layers), itertools.accumulate((m.out_features for m in layers), initial=0)))
        self.weights = {id(m): rows.narrow(0, self.starts[id(m)], m.out_features) for m in layers}


def _kind(layer: "AuroraLinear") -> tuple | None:
    """Layers whose update blocks (and merged weights) are made together: one output width's and
    one input width's factors, one a (a == 1: blocks by output block, else b == 1: by input block;
    one a lets the merged weights of all be made in W's layout at once), one scale. None for
    a > 1 and b > 1."""
    if layer.a > 1 and layer.b > 1:
        return None
    return (id(layer.target), id(layer.source), layer.a, layer.scale)


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

    Two nodes per call with ``sharing``: U · x (:class:`ModeDownProjection`, shared with the
    other layers reading the same input) and the frozen linear with the update written into its
    output (:class:`ReadTogether`, one node for the layers that read one input: q, k, v), which
    hands x's gradient to U · x's node to add its own into. Without dropout on the rank path,
    U · x (no input gradient) and the merged linear (:class:`MergedLinear`) where ``sharing``
    makes the merged weight (:meth:`InputSharing.linear`). Three where the frozen linear must run
    as its own module (ZeRO-3 gathers W there; no ``sharing``): it, U · x and
    the update (:class:`ModeUpdate`). None keeps x where :func:`rebuild_recipe` can do without it.
    """

    def __init__(self, base: nn.Linear, source: AuroraFactors, target: AuroraFactors, scale: float = 1.0,
                 sharing: InputSharing | None = None):
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
        self.sharing = sharing
        self.kind = _kind(self)  # fixed: read on every call
        if sharing is not None and self.kind is not None:
            sharing.register(self.kind, self)

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
        if self.merged:
            return self.base_layer(x)
        down = self.source.down
        dropout = down.dropout if self.training else 0.0
        if self.sharing is not None:  # merged (y = (W + s·ΔW) x + b, exact without dropout) or read together
            y = self.sharing.linear(self, x, dropout)
            if y is not None:
                return y
        y = self.base_layer(x)
        u, sink = (down(x), None) if self.sharing is None else self.sharing.down(down, x, layer=self)
        base = _whole_base(y)
        out = self.target.up(y if base is None else base, u, self, dropout, sink)
        return out if base is None else out.view(y.shape)

    def delta_weight(self) -> torch.Tensor:
        """The full update ``(b*d_out) x (a*d_in)``, ΔW_ji = V · M_ijᵀ · U, for merging."""
        up, U = self.target.up, self.source.down.U
        m = mode_matrices(up.core, self.coeffs.to(up.core.dtype), self.a, self.b)
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


def _whole_base(y: torch.Tensor) -> torch.Tensor | None:
    """The tensor that ``y`` is a plain reshaped view of (nn.Linear on a 3-d input returns one),
    else None. The update is written into it: written into the view, autograd would copy the
    whole gradient in backward (CopySlices)."""
    base = y._base
    if torch.compiler.is_compiling() or base is None or base.numel() != y.numel():
        return None
    if not (base.is_contiguous() and y.is_contiguous()):
        return None
    if y.grad_fn is not None and (type(y.grad_fn).__name__ != "ViewBackward0"
                                  or y.grad_fn.next_functions[0][0] is not base.grad_fn):
        return None  # something else (a hook's Function) between the base and y
    return base

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
    """u_i = dropout(U · x_i): the input blocks of width d into the rank-R mode space."""

    def __init__(self, width: int, rank: int, dropout: float, **kw):
        super().__init__()
        self.U = nn.Parameter(torch.empty(rank, width, **kw))
        self.dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, a: int) -> torch.Tensor:
        # .to(): a set may serve towers kept in different precisions (BLIP-2's fp32 Q-Former).
        return self.dropout(x.unflatten(-1, (a, self.U.shape[1])).to(self.U.dtype) @ self.U.t())


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
        return torch.einsum("pqt,tk->kpq", self.core, coeffs).reshape(b, a, rank, rank)

    def forward(self, u: torch.Tensor, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
        z = torch.einsum("...ip,jipq->...jq", u.to(self.V.dtype), self.mode_matrices(coeffs.to(self.V.dtype), a, b))
        return (z @ self.V.t()).flatten(-2)


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
        delta = self.target.up(self.source.down(x, self.a), self.coeffs, self.a, self.b)
        return y + self.scale * delta.to(y.dtype)

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

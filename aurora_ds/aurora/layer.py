"""The mode-approximation update: global factors per width, coefficients per adapted weight.

Notation follows the paper. For a hidden width ``d`` there is one factor set shared by every
adapted layer of that width: ``U`` (R x d), ``V`` (d x R) and a core ``C`` (R x R x R). A weight
``W`` of shape ``(b*d) x (a*d)`` is seen as ``b x a`` blocks of ``d x d`` and owns only its
coefficients ``Λ`` (R x a*b). Column ``k = j*a + i`` of ``Λ`` belongs to block ``(j, i)``
(output block ``j``, input block ``i``), whose update is

    ΔW_ji = V · M_ijᵀ · U,      M_ij = Σ_t C[:, :, t] · Λ[t, k].

A fused qkv projection (b = 3), an MLP fc1 (b = 4) and fc2 (a = 4) all follow this one rule.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class AuroraFactors(nn.Module):
    """U, V and the core for one hidden width.

    The adapted layers call this module (rather than reading its tensors) so that DeepSpeed
    ZeRO-3, which gathers a module's parameters in that module's own forward hooks, gathers
    the shared factors wherever they are used: in every adapted layer, in ``generate()``, or
    when a submodule is called on its own. The module is registered once, at the model root,
    so its parameters have one name and one optimizer entry.
    """

    def __init__(self, width: int, rank: int, dropout: float = 0.1, dtype=None, device=None):
        super().__init__()
        self.width, self.rank = width, rank
        kw = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(rank, width, **kw))
        self.V = nn.Parameter(torch.zeros(width, rank, **kw))
        self.core = nn.Parameter(torch.empty(rank, rank, rank, **kw))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """U random, core random, V zero: the update is exactly zero at step 0 while every
        factor still receives a gradient (V directly, U and the core through V's first step)."""
        nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))
        nn.init.zeros_(self.V)
        nn.init.xavier_uniform_(self.core)

    def mode_matrices(self, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """M[j, i] = Σ_t C[:, :, t] · Λ[t, j*a + i], shape (b, a, R, R)."""
        return torch.einsum("pqt,tk->kpq", self.core, coeffs).reshape(b, a, self.rank, self.rank)

    def forward(self, x: torch.Tensor, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Δy_j = V · Σ_i M_ijᵀ · dropout(U · x_i) for the input blocks x_i of ``x``."""
        u = self.dropout(x.unflatten(-1, (a, self.width)) @ self.U.t())
        z = torch.einsum("...ip,jipq->...jq", u, self.mode_matrices(coeffs, a, b))
        return (z @ self.V.t()).flatten(-2)

    def delta_weight(self, coeffs: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """The full ``(b*d) x (a*d)`` update, for merging into the frozen weight."""
        m = self.mode_matrices(coeffs, a, b)
        return torch.einsum("dq,jipq,pe->jdie", self.V, m, self.U).reshape(b * self.width, a * self.width)

    def extra_repr(self) -> str:
        return f"width={self.width}, rank={self.rank}"


class AuroraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus its mode-approximation update: y = W x + b + s · Δ(x).

    It sits at the original attribute path, so the backbone's own code calls it unchanged.
    """

    def __init__(self, base: nn.Linear, factors: AuroraFactors, scale: float = 1.0):
        super().__init__()
        d = factors.width
        if base.in_features % d or base.out_features % d:
            raise ValueError(
                f"layer of shape {base.out_features}x{base.in_features} is not made of {d}x{d} blocks"
            )
        self.base_layer = base
        self.a, self.b = base.in_features // d, base.out_features // d
        self.scale = scale
        self.merged = False
        weight = base.weight
        self.coeffs = nn.Parameter(torch.empty(factors.rank, self.a * self.b, dtype=weight.dtype, device=weight.device))
        nn.init.xavier_uniform_(self.coeffs)
        # A plain attribute, not a submodule: the factors are owned once, by the model root.
        object.__setattr__(self, "factors", factors)

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
        return y + self.scale * self.factors(x, self.coeffs, self.a, self.b).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.factors.delta_weight(self.coeffs, self.a, self.b)

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
        return f"blocks={self.b}x{self.a}, width={self.factors.width}, rank={self.factors.rank}, scale={self.scale}"

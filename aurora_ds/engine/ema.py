"""The momentum encoder as an EMA of the trainable parameters only.

The frozen backbone is shared with the online model (the paper's code copies the whole
backbone); momentum features are computed by swapping the EMA values in for one forward.
"""

from __future__ import annotations

import contextlib

import torch


class EMA:
    def __init__(self, backend, named_params: list[tuple[str, torch.nn.Parameter]], momentum: float):
        self.backend, self.momentum = backend, momentum
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.values = backend.full_values(self.params)

    @torch.no_grad()
    def update(self):
        """ema <- m * ema + (1 - m) * online (collective under DeepSpeed: call on all ranks)."""
        for ema, online in zip(self.values, self.backend.full_values(self.params)):
            ema.mul_(self.momentum).add_(online, alpha=1.0 - self.momentum)

    @contextlib.contextmanager
    def swapped(self):
        online = self.backend.exchange(self.params, self.values)
        try:
            yield
        finally:
            self.backend.exchange(self.params, online)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values))

    def load_state_dict(self, state: dict[str, torch.Tensor]):
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {missing[:5]}")
        for n, v in zip(self.names, self.values):
            v.copy_(state[n])

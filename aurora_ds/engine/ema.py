"""The momentum encoder as an EMA of the trainable parameters only.

The frozen backbone is shared with the online model (the paper's code copies the whole
backbone); momentum features are computed by swapping the EMA values in for one forward.
"""

from __future__ import annotations

import contextlib

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    def __init__(self, backend, named_params: list[tuple[str, torch.nn.Parameter]], momentum: float):
        self.backend = backend
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.values = [v.clone() for v in backend.full_values(self.params)]
        self._average = get_ema_multi_avg_fn(momentum)

    def update(self):
        """ema <- m * ema + (1 - m) * online as one foreach lerp over every tensor: a GPU
        launches a kernel per chunk of tensors, where an update per tensor launched two for each
        of an adapter's ~200 (collective under DeepSpeed: call on all ranks)."""
        self._average(self.values, self.backend.full_values(self.params), None)

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

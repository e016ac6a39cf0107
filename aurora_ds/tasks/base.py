"""The one interface every task objective offers the engine (and the evaluators).

An objective is an ``nn.Module`` around the backbone whose ``forward`` does all the backbone
work, so that DeepSpeed's engine forward wraps every use of the (partitioned) parameters:
calling submodules outside the engine's forward breaks ZeRO-3 gradient accumulation. Which
objective a run gets is decided in one table, ``tasks/objectives.py``.
"""

from __future__ import annotations

import torch
from torch import nn


class Objective(nn.Module):
    """``losses`` runs one micro-batch through the engine's ``forward``; ``forward(batch, step,
    mode, extra)`` serves training (``train``) and the task's inference modes; the objective's
    own state (a feature queue, nothing by default) is checkpointed by the engine through
    ``objective_state`` / ``load_objective_state``."""

    def __init__(self, backbone, cfg, tokenizer=None, special=None):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.ema = None  # set by the engine once the parameters are wrapped
        self.tokenizer = tokenizer  # objectives that tokenise or decode text need it
        self.special = special  # BLIP's token conventions (backbones/blip.py SpecialTokens); BLIP-2 keeps its own

    def forward(self, batch: dict, step: int, mode: str, extra=None):
        raise NotImplementedError

    def losses(self, forward, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """One forward per micro-batch; ``forward`` is the engine's (it calls ``self.forward``)."""
        return forward(batch, step, "train")

    def objective_state(self) -> dict:
        return {}

    def load_objective_state(self, state: dict):
        pass

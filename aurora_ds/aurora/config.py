"""Aurora configuration: which layers to adapt, with which rank, and which extras to switch on."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

# The adapter directory format (aurora/io.py). 4: the config records a SHA-256 of its own content;
# 3: an adapter may record the run that trained it and carry small files (its tokenizer, answer
# list); 2 lacked both.
FORMAT_VERSION = 4


@dataclass
class AuroraConfig:
    """Everything that defines an Aurora adapter, independent of any backbone.

    ``targets`` is either a preset name understood by the backbone registry (``"paper"``,
    ``"all-linear"``) or a list of regular expressions matched (``re.fullmatch``) against
    module names. Every hidden width gets its own factor set; ``ranks`` overrides ``rank`` per
    width (``{1408: 64}``). ``tower_ranks`` gives the layers under a module prefix (a tower:
    ``{"qformer": 16}``) factor sets of their own at that rank, instead of sharing the model-wide
    sets of their widths.

    ``merged`` runs a layer through one merged weight W + s·ΔW (made once per step) where the
    rank-path dropout is 0 (``dropout`` 0, or evaluation), and not while compiling, under
    activation checkpointing or under ZeRO-3: ``auto`` where the
    batch's rows make the merged copy small beside the activations (layer.MERGE_ROWS), ``on`` always (an
    error under ZeRO-3), ``off`` never. It changes no result, only what a
    step launches and holds (layer.py, docs/method.md).
    """

    rank: int = 32
    targets: str | list[str] = "paper"
    dropout: float = 0.1
    scale: float = 1.0
    ranks: dict[int, int] = field(default_factory=dict)
    tower_ranks: dict[str, int] = field(default_factory=dict)
    context_enhancement: bool = True
    context_scale: float = 0.1
    gated_query: bool = True
    gated_query_scale: float = 0.1
    gated_query_targets: list[str] = field(default_factory=list)
    merged: str = "auto"
    backbone: str | None = None

    def __post_init__(self):
        self.ranks = {int(k): v for k, v in self.ranks.items()}
        self.tower_ranks = dict(self.tower_ranks)
        checks = [("rank", self.rank), *((f"ranks[{w}]", r) for w, r in self.ranks.items()),
                  *((f"tower_ranks[{t!r}]", r) for t, r in self.tower_ranks.items())]
        for name, value in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AuroraConfig.{name} must be a positive integer, got {value!r}")
        for f in fields(self):  # nan passes every range check below and inf a scale: refused first
            value = getattr(self, f.name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if f.type == "float" and not (number and math.isfinite(value)):
                raise ValueError(f"AuroraConfig.{f.name} must be a finite number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"AuroraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.merged not in ("auto", "on", "off"):
            raise ValueError(f"AuroraConfig.merged must be auto, on or off, got {self.merged!r}")
        if self.merged == "on" and self.dropout > 0:
            raise ValueError(f"AuroraConfig.merged 'on' needs dropout 0 (the merged weight is exact only without "
                             f"the rank path's dropout), got dropout {self.dropout}; use 'auto' to merge in evaluation only")
        if isinstance(self.targets, str):
            if not self.targets:
                raise ValueError("AuroraConfig.targets is empty")
        elif not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(f"AuroraConfig.targets must be a preset name or a list of patterns, got {self.targets!r}")
        else:
            self.targets = list(self.targets)

        for tower in self.tower_ranks:
            if not tower or tower.startswith(".") or tower.endswith("."):
                raise ValueError(f"AuroraConfig.tower_ranks: {tower!r} is not a module-name prefix")

    def tower_of(self, layer_name: str) -> str:
        """The longest ``tower_ranks`` prefix that contains ``layer_name`` ("" for none)."""
        towers = [t for t in self.tower_ranks if layer_name.startswith(t + ".")]
        return max(towers, key=len, default="")

    def rank_for(self, width: int, tower: str = "") -> int:
        return self.tower_ranks[tower] if tower else self.ranks.get(width, self.rank)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AuroraConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AuroraConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

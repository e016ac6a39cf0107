"""Which objective a run trains: one table keyed by (model interface, task).

The model interface is the backbone spec's ``interface`` (``blip``, ``blip2``); the task is the
run's ``task`` (``retrieval``, ``qa``). A new backbone family or task is one new row here.
"""

from __future__ import annotations

from .base import Objective
from .blip2 import Blip2QAObjective, Blip2RetrievalObjective
from .qa import QAObjective
from .retrieval import RetrievalObjective

OBJECTIVES: dict[tuple[str, str], type[Objective]] = {
    ("blip", "retrieval"): RetrievalObjective,
    ("blip", "qa"): QAObjective,
    ("blip2", "retrieval"): Blip2RetrievalObjective,
    ("blip2", "qa"): Blip2QAObjective,
}


def make_objective(family: str, task: str, model, cfg, tokenizer=None, special=None) -> Objective:
    """The objective for (``family``, ``task``) around ``model``, with the run's tokenizer and
    special tokens (``engine/setup.py``); a clear error for a pair nothing serves."""
    if (family, task) not in OBJECTIVES:
        known = ", ".join(f"({f!r}, {t!r})" for f, t in OBJECTIVES)
        raise ValueError(f"no objective for model family {family!r} and task {task!r}; known pairs: {known}")
    return OBJECTIVES[family, task](model, cfg, tokenizer, special)

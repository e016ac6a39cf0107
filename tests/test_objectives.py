"""The objective table: every (interface, task) pair a registered backbone can be trained on is
served, and an unserved pair is a clear error."""

import pytest

from aurora_ds.backbones import get_spec, list_backbones
from aurora_ds.tasks.base import Objective
from aurora_ds.tasks.objectives import OBJECTIVES, make_objective

TASKS = {"retrieval": "retrieval", "vqa": "qa"}  # spec.task -> the run's task


def test_every_trainable_backbone_has_an_objective():
    for name in list_backbones():
        spec = get_spec(name)
        if spec.task in TASKS:
            assert (spec.interface, TASKS[spec.task]) in OBJECTIVES, name
    assert all(issubclass(cls, Objective) for cls in OBJECTIVES.values())


def test_unknown_pair_names_the_pair_and_the_known_ones():
    with pytest.raises(ValueError, match=r"'clip'.*'retrieval'.*known pairs: \('blip', 'retrieval'\)"):
        make_objective("clip", "retrieval", None, None)

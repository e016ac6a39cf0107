"""Counting input faults: every dropped entry is counted and the first few are kept for the report."""

import json
import re

# Object reprs carry addresses ("<_io.BytesIO object at 0x7f...>") that differ on every run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _reproducible(detail):
    """The detail without memory addresses, so manifest.json is the same on every run."""
    if isinstance(detail, str):
        return _ADDRESS.sub("", detail)
    if isinstance(detail, dict):
        return {k: _reproducible(v) for k, v in detail.items()}
    if isinstance(detail, (list, tuple)):
        return [_reproducible(v) for v in detail]
    return detail

EXAMPLES_PER_REASON = 5

# Reasons, in the order they are reported.
REASONS = {
    "missing_media": "image/video file not found",
    "unreadable_media": "image/video file cannot be read or decoded",
    "unknown_media": "caption/question/answer refers to an image/video the annotation does not list",
    "duplicate_id": "id (or sample key) seen twice; later copies dropped",
    "duplicate_entry": "same image/video and same caption listed twice; later copies dropped",
    "empty_text": "empty caption/question; dropped",
    "non_utf8_text": "caption/question is not valid UTF-8; dropped",
    "no_text": "image/video left without any caption/question; sample dropped",
}


class Faults:
    """Counts per reason plus the first EXAMPLES_PER_REASON offending entries."""

    def __init__(self, counts=None, examples=None):
        self.counts = dict(counts or {})
        self.examples = {k: list(v) for k, v in (examples or {}).items()}

    def add(self, reason, detail):
        if reason not in REASONS:
            raise ValueError(f"unknown fault reason {reason!r}")
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES_PER_REASON:
            shown.append(_reproducible(detail))

    def __bool__(self):
        return bool(self.counts)

    def state(self):
        """JSON-able copy, stored in the partial manifest so a resumed run reports the same faults."""
        return {"counts": dict(self.counts), "examples": {k: list(v) for k, v in self.examples.items()}}

    @classmethod
    def from_state(cls, state):
        return cls(state["counts"], state["examples"])

    def report(self):
        """Human-readable lines: one per reason with its count and first entries."""
        lines = []
        for reason in REASONS:
            if reason in self.counts:
                lines.append(f"fault {reason}: {self.counts[reason]} ({REASONS[reason]})")
                lines += [f"  e.g. {json.dumps(e, ensure_ascii=True)}" for e in self.examples[reason]]
        return lines

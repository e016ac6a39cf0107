"""The output layout of a run, in one place: everything that writes or reads a run's files asks
this object for the path instead of spelling it out. An adapter records its run and carries its
tokenizer and answer list (engine/adapter_record.py); ``aurora-eval`` finds the run directory an
adapter sits in with :meth:`RunDir.of_adapter` only to check that the two agree::

    out_dir/
        adapter_latest/, adapter_best/     adapter directories (aurora.io format)
        checkpoints/step_000100/           full engine checkpoints (engine/checkpoint.py)
        tb/                                TensorBoard event files
        eval/step_000100.json              metrics per evaluation (validation, data.eval_shards)
        eval/results_step_000100.json      QA answers per evaluation
        eval/test_step_000100.json         test metrics (data.test_shards) of the adapter of that step
        eval/test_results_step_000100.json QA answers on test
        tokenizer/                         the tokenizer trained on the run's text, if any
        answer_list.json                   the answers QA candidate inference ranked
        summary.json                       the run's summary (steps, losses, best, memory)
        train.log                          console output, where a launcher captures it
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS = ("adapter_latest", "adapter_best")
CHECKPOINT_ADAPTER = "adapter"  # the adapter inside each engine checkpoint
SPLITS = ("val", "test")  # evaluation sets: validation (periodic, chooses adapter_best) and test


def _split_prefix(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"evaluation split must be one of {SPLITS}, got {split!r}")
    return "" if split == "val" else f"{split}_"


class RunDir:
    """Paths of one run's outputs under ``root``; nothing is created until written."""

    def __init__(self, root):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    @classmethod
    def of_adapter(cls, adapter_dir) -> RunDir | None:
        """The run an adapter directory belongs to (``adapter_latest``, ``adapter_best``, or a
        checkpoint's ``adapter``), or None for an adapter that lives on its own."""
        path = Path(adapter_dir).resolve()
        if path.name in ADAPTERS:
            return cls(path.parent)
        if path.name == CHECKPOINT_ADAPTER and path.parent.name.startswith("step_") \
                and path.parent.parent.name == "checkpoints":
            return cls(path.parent.parent.parent)
        return None

    @property
    def adapter_latest(self) -> Path:
        return self.root / "adapter_latest"

    @property
    def adapter_best(self) -> Path:
        return self.root / "adapter_best"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tb"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def eval_metrics(self, step: int, split: str = "val") -> Path:
        return self.eval / f"{_split_prefix(split)}step_{step:06d}.json"

    def eval_results(self, step: int, split: str = "val") -> Path:
        return self.eval / f"{_split_prefix(split)}results_step_{step:06d}.json"

    def latest_eval_metrics(self) -> Path | None:
        found = sorted(self.eval.glob("step_*.json"))
        return found[-1] if found else None

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def answer_list(self) -> Path:
        return self.root / "answer_list.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

"""Rank-0 logging: TensorBoard scalars, a console progress bar with ETA, plain messages."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLogger:
    def __init__(self, log_dir, enabled: bool, total_steps: int, start_step: int, progress: bool, every: int = 1):
        self.enabled, self.total, self.every = enabled, total_steps, every
        self.writer = self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True, file=sys.stderr)

    def message(self, text: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def scalars(self, step: int, values: dict, prefix: str = "train"):
        """Numbers only: nested values (an evaluation's chance levels) are no curves."""
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)

    def advance(self, step: int, postfix: dict):
        """The progress bar, or without one (logs, batch jobs) a line every ``every`` steps."""
        terms = {k: f"{v:.4g}" for k, v in postfix.items()}
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(terms, refresh=True)
        elif step % self.every == 0 or step == self.total:
            self.message(f"[aurora] step {step}/{self.total} " + " ".join(f"{k}={v}" for k, v in terms.items()))

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()

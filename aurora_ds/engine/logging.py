"""Rank-0 logging: TensorBoard scalars, a console progress bar with ETA, plain messages; and
what each rank measures of itself (peak memory)."""

from __future__ import annotations

import re
import resource
import sys
import threading

import torch


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else this process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb(kind: str = "RssAnon") -> float | None:
    """This process's resident memory of ``kind``: anonymous (``RssAnon``, what it holds itself) by
    default. RSS also
    counts the pages of files it maps (``RssFile``), such as checkpoint shards, which the node's
    processes share and the kernel can drop and read again. None where ``/proc`` does not say."""
    try:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{kind}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(found.group(1)) / 1024 if found else None


class HostMemory:
    """Peak ``RssAnon`` per phase of a run (loading, training, evaluation), sampled every 10 ms by
    a daemon thread: no counter of the kernel keeps an anonymous-memory peak."""

    def __init__(self, phase: str):
        self.peaks: dict[str, float] = {}
        self._phase, self._stop = phase, threading.Event()
        self._lock = threading.Lock()
        self._sample()
        threading.Thread(target=self._watch, daemon=True).start()

    def _sample(self) -> None:
        value = resident_mb()
        if value is not None:
            with self._lock:
                self.peaks[self._phase] = max(self.peaks.get(self._phase, 0.0), value)

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self._sample()

    def phase(self, name: str) -> None:
        """End the current phase (one last sample) and start ``name``."""
        self._sample()
        with self._lock:
            self._phase = name
        self._sample()

    def watching(self, name: str, function):
        """``function`` whose calls are phase ``name`` (evaluations inside training), or None."""
        if function is None:
            return None

        def call(*args, **kwargs):
            previous = self._phase
            self.phase(name)
            try:
                return function(*args, **kwargs)
            finally:
                self.phase(previous)

        return call

    def stop(self) -> dict[str, float]:
        self._sample()
        self._stop.set()
        return {k: round(v, 1) for k, v in self.peaks.items()}


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

"""How DataLoader workers start, and what a silent one is doing.

Workers never fork the process that asks for them. By the time a loader starts workers, a
training process runs threads (gloo's, the TCP store's, S3 read-ahead, the TensorBoard writer,
intra-op pools), and a forked child inherits every lock those threads held at that instant: a
worker that then waits forever before its first item. Workers come from multiprocessing's
*forkserver* instead: a process made by fork + exec (it inherits nothing), which imports the
loader and what the main module imports once, and forks each worker from its single thread.
A worker still runs the main module's body, as under every start method but fork (so a script
that builds a loader keeps its work under ``if __name__ == "__main__":``), but finds its imports
done: it starts in a fraction of a second, not in the seconds that importing torch, DeepSpeed
and transformers takes.

The forkserver starts once per process, so it would keep the environment of that moment: each
worker takes the environment its loader was created under (what a fork would have given it).

A silent worker is diagnosed from the first instant of its life: the forkserver installs the
stack dump (faulthandler on ``STACK_SIGNAL``) before it forks anyone, the parent sends the signal
only to workers that /proc shows catching it (an uncaught SIGUSR1 would kill the worker and the
evidence), and each worker posts its phase on a shared ``Board``.
"""

import ast
import multiprocessing
import os
import signal
import sys
import time

STACK_SIGNAL = signal.SIGUSR1  # a worker asked for its stacks prints them (faulthandler)
PRELOAD = "aurora_ds.data.forkserver_preload"

# Phases a worker posts on the board, in order.
STARTING, STARTED, READING, BATCHES = range(4)


def context():
    """The multiprocessing context loader workers start from: forkserver where the platform has
    it (Linux, macOS), else spawn (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD] + main_imports())
    return ctx


def main_imports():
    """The modules the main module imports at its top level (``python -m pkg.mod``: that module).

    Preloaded in the forkserver so that a worker, which runs the main module's body again, finds
    them imported. (multiprocessing's own ``"__main__"`` preload does nothing before Python 3.13:
    it looks for a key its preparation data never has.)"""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name:
        return [name]
    try:
        with open(main.__file__, "rb") as f:
            tree = ast.parse(f.read())
    except (AttributeError, TypeError, OSError, SyntaxError, ValueError):
        return []
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
    return names


class Board:
    """Per worker, in shared memory: its phase, the shard it reads (an index into the loader's
    URL list) and the batches it has made. Written by the worker, read by the parent only when
    a worker is silent."""

    FIELDS = 3

    def __init__(self, ctx, workers):
        self.values = ctx.RawArray("q", workers * self.FIELDS)

    def post(self, worker, phase, shard=None, batches=None):
        base = worker * self.FIELDS
        self.values[base] = phase
        if shard is not None:
            self.values[base + 1] = shard
        if batches is not None:
            self.values[base + 2] = batches

    def describe(self, worker, urls):
        phase, shard, batches = self.values[worker * self.FIELDS:(worker + 1) * self.FIELDS]
        if phase == STARTING:
            return "still starting (never reached the loader's code)"
        if phase == STARTED:
            return "started, before its first shard"
        where = "reading %s" % urls[shard] if 0 <= shard < len(urls) else "reading"
        return "%s, %d batch(es) made" % (where, batches)


class WorkerInit:
    """``worker_init_fn``: the worker takes its loader's environment and posts that it started."""

    def __init__(self, board):
        self.environ = dict(os.environ)
        self.board = board

    def __call__(self, worker):
        os.environ.clear()
        os.environ.update(self.environ)
        self.board.post(worker, STARTED)


def catches(pid, signum):
    """Whether process ``pid`` has a handler for ``signum`` (Linux /proc; None where unknown)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        return None
    return None


def diagnose(processes, board, urls):
    """Ask every live worker that catches ``STACK_SIGNAL`` to print its Python stacks to stderr,
    and say in words what each was doing (for a timeout's message)."""
    lines, asked = [], False
    for worker, process in enumerate(processes):
        state = board.describe(worker, urls)
        if not process.is_alive():
            lines.append("worker %d (exited %s): %s" % (worker, process.exitcode, state))
            continue
        if catches(process.pid, STACK_SIGNAL) is False:
            lines.append("worker %d (pid %d, no stack handler): %s" % (worker, process.pid, state))
            continue
        try:
            os.kill(process.pid, STACK_SIGNAL)
            asked = True
        except OSError:
            pass
        lines.append("worker %d (pid %d, stacks printed above): %s" % (worker, process.pid, state))
    if asked:
        time.sleep(1.0)  # (the dump is written by the worker's signal handler)
    return lines

"""Checkpoints: the adapter (what users share) and the full state for exact resume.

Where they go in a run is :class:`~aurora_ds.engine.rundir.RunDir`'s; inside one checkpoint::

    checkpoints/step_000100/                 one full checkpoint
        adapter/                             the trainable values, gathered (also the fallback
                                             when resuming on another number of ranks)
        deepspeed/ or plain_state.pt         optimizer, scheduler (DeepSpeed or plain path)
        client_state.pt                      step, EMA, feature queue (same on all ranks)
        rank_00000.pt ...                    per-rank RNG and data position
        trainer_state.json                   world size, step, config
        COMPLETE                             written last (atomically): only complete checkpoints
                                             resume; it records the size and SHA-256 of every
                                             file, checked when the run is set up, before the
                                             backbone is built (:func:`verify_checkpoint`)

Only tensors and plain containers go into the ``.pt`` files, read back with
``torch.load(weights_only=True)``. DeepSpeed's own files are its format (trusted: your run).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from ..aurora.io import check_digest, file_digest, read_adapter, write_adapter
from ..dist import barrier, gather_objects, stop_if_any_rank_failed, world
from .rundir import CHECKPOINT_ADAPTER, RunDir

COMPLETE = "COMPLETE"


def save_adapter(backend, handle, directory, extra: dict | None = None, record=None):
    """Gather only the trainable tensors (never the backbone) and write them from rank 0, with
    Aurora's buffers (never partitioned: the same on every rank) and what ``record`` (an
    ``AdapterRecord``) says about the run and the files it carries."""
    named = handle.named_trainable_parameters()
    values = backend.full_values([p for _, p in named])
    if world()[0] == 0:
        tensors = {n: v.to(p.dtype).cpu() for (n, p), v in zip(named, values)}
        tensors.update({n: b.detach().cpu() for n, b in handle.named_aurora_buffers()})
        run, files = record.contents() if record is not None else (None, None)
        write_adapter(directory, tensors, handle.config, handle.describe(), extra, run, files)
    barrier()


def load_adapter_values(backend, handle, directory):
    """Load an adapter directory into an injected (possibly partitioned) model."""
    tensors, _ = read_adapter(directory, handle)
    named = handle.named_trainable_parameters()
    backend.set_values([p for _, p in named], [tensors[n] for n, _ in named])
    load_buffers(handle, tensors)


@torch.no_grad()
def load_buffers(handle, tensors: dict):
    for name, buf in handle.named_aurora_buffers():
        buf.copy_(tensors[name].to(buf.dtype))


def save_checkpoint(run: RunDir, step: int, backend, handle, client_state: dict, data_state: dict, cfg, keep: int,
                    record=None):
    root = run.checkpoints
    path = run.checkpoint(step)
    me, size = world()
    if me == 0 and path.exists():
        shutil.rmtree(path)
    barrier()
    save_adapter(backend, handle, path / CHECKPOINT_ADAPTER, {"step": step}, record)
    if backend.distributed:
        backend.engine.save_checkpoint(str(path / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif me == 0:
        torch.save(backend.state_dict(), path / "plain_state.pt")
    # The main process draws randomness from torch only (dropout); loader workers seed themselves.
    torch.save({"rng": torch.get_rng_state(), "data": data_state}, path / f"rank_{me:05d}.pt")
    if me == 0:
        torch.save(client_state, path / "client_state.pt")
        (path / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": size, "config": cfg.to_dict()}, indent=2))
    barrier()
    # Every rank digests the files it sees (on storage not shared between nodes, its own).
    digests = {}
    for part in gather_objects(digest_files(path)):
        digests.update(part)
    if me == 0:
        mark_complete(path, digests)
        complete = sorted(p for p in root.iterdir() if (p / COMPLETE).exists())
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
        # Folders a killed run left half-written can never be resumed from: remove them.
        for partial in root.glob("step_*"):
            if partial.is_dir() and not (partial / COMPLETE).exists():
                shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return path


def _files(path: Path) -> list[str]:
    return [str(f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file() and f.name != COMPLETE]


def digest_files(path: Path) -> dict:
    """Size and SHA-256 of every file under a checkpoint directory but its marker, by relative name."""
    return {name: file_digest(path / name) for name in _files(path)}


def mark_complete(path: Path, digests: dict) -> None:
    """Write the ``COMPLETE`` marker recording ``digests``: a temporary file, flushed to disk, then
    renamed over the marker, so that a crash never leaves a marker that is there but half written."""
    tmp = path / f".{COMPLETE}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps({"tag": path.name, "files": digests}, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / COMPLETE)
    folder = os.open(path, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def verify_checkpoint(path: Path) -> None:
    """Refuse a checkpoint its ``COMPLETE`` marker does not vouch for, naming what is wrong: an
    empty or unreadable marker, a file there that it does not record, a recorded file that is
    missing or whose size or SHA-256 differs. A check that is skipped would let flipped bytes
    resume (a damaged optimizer state dies later with a NaN naming no file). Collective, at run
    setup before the backbone is built: each rank checks the files it sees, and a recorded file
    counts as missing when no rank sees it (files another node wrote may be absent here)."""
    marker, problem, missing = path / COMPLETE, None, []
    try:
        try:
            recorded = json.loads(marker.read_text())["files"]
            if not isinstance(recorded, dict) or not recorded or not all(isinstance(d, dict) for d in recorded.values()):
                raise ValueError("it records no files")
        except (OSError, ValueError, KeyError, TypeError) as exn:
            raise ValueError(f"{marker} is empty or unreadable ({exn}): it must record the size and SHA-256 of every "
                             f"file of checkpoint {path}, which therefore cannot be checked; resume from another "
                             f"checkpoint") from None
        unrecorded = sorted(set(_files(path)) - set(recorded))
        if unrecorded:
            raise ValueError(f"checkpoint {path} holds files its {marker} does not record: {', '.join(unrecorded)} "
                             f"(an entry was removed from the marker, or files were added after it was written): "
                             f"they cannot be checked; resume from another checkpoint")
        missing = sorted(name for name in recorded if not (path / name).is_file())
        for name in sorted(set(recorded) - set(missing)):
            check_digest(path / name, recorded[name], marker)
    except (OSError, ValueError) as exn:
        problem = exn
    stop_if_any_rank_failed(problem, f"checking checkpoint {path}")
    gone = sorted(set.intersection(*(set(m) for m in gather_objects(missing))))
    if gone:
        raise FileNotFoundError(f"checkpoint {path} is missing {', '.join(str(path / name) for name in gone)}: its "
                                f"{marker} records {'them' if len(gone) > 1 else 'it'}; resume from another checkpoint")


def _load(path: Path):
    try:
        return torch.load(path, weights_only=True)
    except Exception as exn:  # noqa: BLE001 - any failure to read is this file's
        raise ValueError(f"checkpoint file {path} cannot be read: {exn}") from None


def find_checkpoint(run: RunDir, resume: str) -> Path | None:
    """``auto``: the run's newest complete checkpoint (incomplete ones are ignored), or None."""
    if resume == "auto":
        root = run.checkpoints
        complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists()) if root.is_dir() else []
        return complete[-1] if complete else None
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / COMPLETE).exists():
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): the run stopped while writing it")
    return path


def load_checkpoint(path: Path, backend, handle, log) -> tuple[int, dict, dict | None]:
    """Restore a checkpoint that :func:`verify_checkpoint` passed; returns (step, client_state,
    data_state or None).

    On a different number of ranks DeepSpeed cannot re-partition optimizer state: the run
    restarts from the checkpoint's adapter with a fresh optimizer, and says so.
    """
    me, size = world()
    meta = json.loads((path / "trainer_state.json").read_text())
    client = _load(path / "client_state.pt")
    if meta["world_size"] != size:
        log(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has {size}: "
            f"optimizer state cannot be re-partitioned, so training restarts from its adapter with a "
            f"fresh optimizer at step {meta['step']} (data restarts at the beginning of the epoch)")
        load_adapter_values(backend, handle, path / CHECKPOINT_ADAPTER)
        for _ in range(meta["step"]):
            backend.scheduler.step()
        return meta["step"], client, None
    if backend.distributed:
        backend.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
        load_buffers(handle, read_adapter(path / CHECKPOINT_ADAPTER, handle)[0])
    else:
        load_adapter_values(backend, handle, path / CHECKPOINT_ADAPTER)
        backend.load_state_dict(_load(path / "plain_state.pt"))
    mine = _load(path / f"rank_{me:05d}.pt")
    torch.set_rng_state(mine["rng"])
    return meta["step"], client, mine["data"]

"""The adapter file format: a directory with ``adapter_config.json`` and ``adapter.safetensors``.

Safetensors holds plain tensors only, so loading a shared adapter never unpickles anything.
Writes go to a temporary sibling directory that is renamed into place, so a reader (or a
crash) never sees half an adapter. The config records the size and SHA-256 of the tensor file,
checked on every load: a damaged file (flipped bytes load fine as safetensors, as NaNs) is
refused with its path, and so is any non-finite value. The config also records a SHA-256 of
each of its own keys (``content_sha256``), so an edited value (``aurora.scale``), which would
load and silently change what the adapter computes, is refused naming the file and the key; a
removed record (of the tensor file, or of the config itself) is refused too, never skipped.

A caller may add what it knows about the run that trained the adapter (``run``: plain values,
recorded as given) and small files to travel inside the adapter (a tokenizer, an answer list),
digested like the tensor file and checked when read back (:func:`adapter_path`). What those
mean is the caller's business; this module only writes, reads and checks them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import FORMAT_VERSION, AuroraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
CONTENT_DIGEST = "content_sha256"
# Format 2 has no ``run`` record and no extra files, and the first format-2 adapters no ``files``
# record; its tensors and structure read the same. Format 3 always wrote ``files``; format 4 also
# ``content_sha256``. Older formats cannot have their config checked: write them again to cover it.
READABLE_VERSIONS = (2, 3, FORMAT_VERSION)


def write_adapter(directory, tensors: dict[str, torch.Tensor], config: AuroraConfig, structure: dict, extra=None,
                  run: dict | None = None, files: dict | None = None):
    """Write an adapter directory atomically. ``run``: what the caller records about the run
    (JSON-safe); ``files``: ``{name inside the adapter: source path}``, copied in and digested."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "method": "aurora",
        "aurora": config.to_dict(),
        **structure,
        "tensors": {n: list(t.shape) for n, t in tensors.items()},
        "extra": extra or {},
    }
    if run is not None:
        meta["run"] = run
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(tmp / WEIGHTS_FILE))
    meta["files"] = {WEIGHTS_FILE: file_digest(tmp / WEIGHTS_FILE)}
    for name, source in sorted((files or {}).items()):
        if name in (CONFIG_FILE, WEIGHTS_FILE) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"adapter file name {name!r} is not a plain relative name of its own")
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / name)
        meta["files"][name] = file_digest(tmp / name)
    meta[CONTENT_DIGEST] = content_digest(meta)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        shutil.rmtree(old)


def file_digest(path) -> dict:
    """Size and SHA-256 of a file, as recorded next to tensor files and checked on load."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def check_digest(path, recorded: dict, where) -> None:
    """Refuse a file whose size or checksum differs from what ``where`` recorded."""
    actual = file_digest(path)
    if actual["bytes"] != recorded.get("bytes") or actual["sha256"] != recorded.get("sha256"):
        raise ValueError(f"{path} is damaged: {actual['bytes']} bytes with SHA-256 {actual['sha256'][:16]}..., "
                         f"but {where} recorded {recorded.get('bytes')} bytes with SHA-256 "
                         f"{str(recorded.get('sha256'))[:16]}...")


def content_digest(meta: dict) -> dict:
    """SHA-256 of each key of an adapter config but ``content_sha256`` itself, over its canonical
    JSON (sorted keys, as read back), so that a check can name the key that changed."""
    canonical = json.loads(json.dumps({k: v for k, v in meta.items() if k != CONTENT_DIGEST}))
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            for k, v in canonical.items()}


def _check_content(path: Path, meta: dict) -> None:
    """Refuse a config edited after it was written, or stripped of a record its format always has."""
    version = meta["format_version"]
    recorded = meta.get(CONTENT_DIGEST)
    if recorded is not None or version >= 4:
        if not isinstance(recorded, dict):
            raise ValueError(f"{path} has no valid {CONTENT_DIGEST} record (the SHA-256 of its content, which adapter "
                             f"format {version} always writes): it was edited after it was written, so its values "
                             f"cannot be trusted; restore the file or write the adapter again")
        actual = content_digest(meta)
        changed = [f"key {k!r} " + ("was removed" if k not in actual else "was added" if k not in recorded else "differs")
                   for k in sorted(set(recorded) | set(actual)) if recorded.get(k) != actual.get(k)]
        if changed:
            raise ValueError(f"{path} was edited after it was written ({', '.join(changed)}, against the SHA-256 of "
                             f"each key recorded in {CONTENT_DIGEST}): an edited value would load and change what the "
                             f"adapter computes; restore the file or write the adapter again")
    if version >= 3 and not isinstance((meta.get("files") or {}).get(WEIGHTS_FILE), dict):
        raise ValueError(f"{path} records no size and SHA-256 of {WEIGHTS_FILE} (key 'files'), which adapter format "
                         f"{version} always writes: the record was removed, so {WEIGHTS_FILE} cannot be checked")


def load_tensors(path, digest: dict | None = None, where: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file, checked against its recorded digest, every value finite; any
    failure is an error naming the file (and the tensor)."""
    path = Path(path)
    if digest is not None:
        check_digest(path, digest, where)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{path}: tensor {name} holds non-finite values (NaN or inf)")
    return tensors


def read_adapter_config(directory) -> dict:
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not an adapter: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if meta.get("method") != "aurora" or meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: unsupported adapter (method {meta.get('method')!r}, format_version "
            f"{meta.get('format_version')!r}; this version reads aurora formats {READABLE_VERSIONS})"
        )
    _check_content(path, meta)
    return meta


def adapter_path(directory, name: str) -> Path:
    """A file the adapter carries (``answer_list.json``), or a folder of them (``tokenizer``),
    after checking every such file against the size and SHA-256 recorded when it was written."""
    directory = Path(directory)
    recorded = read_adapter_config(directory).get("files", {})
    chosen = {f: d for f, d in recorded.items() if f == name or f.startswith(name.rstrip("/") + "/")}
    if not chosen:
        raise FileNotFoundError(f"adapter {directory} carries no {name} (its {CONFIG_FILE} records {sorted(recorded)})")
    for file, digest in chosen.items():
        if not (directory / file).is_file():
            raise FileNotFoundError(f"{directory / file} is missing: {directory / CONFIG_FILE} records it")
        check_digest(directory / file, digest, directory / CONFIG_FILE)
    return directory / name


def read_adapter(directory, handle) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of an adapter directory, checked name by name and shape by shape against ``handle``."""
    meta = read_adapter_config(directory)
    recorded = meta.get("factor_sets", {})
    actual = handle.describe()["factor_sets"]
    if recorded != actual:
        raise ValueError(f"adapter {directory} has factor sets {recorded}, the model has {actual}")
    digest = meta.get("files", {}).get(WEIGHTS_FILE)  # checked present by read_adapter_config, but in format 2
    tensors = load_tensors(Path(directory) / WEIGHTS_FILE, digest, Path(directory) / CONFIG_FILE)
    params = dict(handle.named_trainable_parameters() + handle.named_aurora_buffers())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    buffers = {name for name, _ in handle.named_aurora_buffers()}
    if meta["format_version"] == 2 and missing and set(missing) <= buffers:
        raise ValueError(f"adapter {directory} is format 2, saved before ICE kept its evaluation context "
                         f"({', '.join(missing)}): this version cannot evaluate it faithfully; train it again")
    if missing or unexpected:
        raise ValueError(
            f"adapter {directory} does not fit this model: tensors missing from the file {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}, tensors the model lacks {unexpected[:10]}"
            f"{'...' if len(unexpected) > 10 else ''}"
        )
    for name, value in tensors.items():
        want = list(getattr(params[name], "ds_shape", params[name].shape))
        if list(value.shape) != want:
            raise ValueError(f"adapter {directory}: tensor {name} has shape {list(value.shape)}, the model expects {want}")
    return tensors, meta


"""A checkpoint's weights into a model built partitioned under ZeRO-3: file by file, each rank
reading only its own share.

transformers' ``from_pretrained`` under ZeRO-3 has rank 0 read every shard file into one state
dict and gathers each module whole on every rank to copy it in: at BLIP-2 OPT-2.7B rank 0 maps
the whole model, and every rank briefly holds each module whole. ZeRO-3's partition of a tensor
is a contiguous range of its flattened elements (rank r of a group of N holds [r·p, (r+1)·p) with
p = ⌈n / N⌉), so a rank can read from a safetensors file just the rows that cover its range and
write them into its partition: no collective, no gathered copy, and no rank reads more than its
share plus one row per tensor. The values are cast to the dtype the model was built in (the
checkpoint's, when the run's precision matches it).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dist import group_rank

INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class LoadReport:
    """What one rank read: the files, the bytes it read of them, and how long it took."""

    files: int
    read_bytes: int
    seconds: float
    unused_keys: list[str]


def weight_files(checkpoint) -> list[Path]:
    """The checkpoint's weight files: those its index names, else its single weight file."""
    path = Path(checkpoint)
    for index in INDEXES:
        if (path / index).is_file():
            try:
                weight_map = json.loads((path / index).read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise ValueError(f"{path / index}: not a weight index ({e})") from None
            files = [path / name for name in dict.fromkeys(weight_map.values())]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{path / index} names weight files that do not exist: {absent}")
            return files
    for name in SINGLE_FILES:
        if (path / name).is_file():
            return [path / name]
    raise FileNotFoundError(f"{path}: no weights ({', '.join(INDEXES + SINGLE_FILES)})")


class _Rows:
    """Row ranges of a checkpoint file's tensors, read without loading the rest of the file:
    safetensors through ``get_slice``, ``.bin`` files memory-mapped (``weights_only``)."""

    def __init__(self, file: Path):
        self.file = file
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            self._handle = safe_open(str(file), framework="pt")
            self._bin = None
        else:
            self._bin = torch.load(file, map_location="cpu", mmap=True, weights_only=True)

    def keys(self) -> list[str]:
        return list(self._bin) if self._bin is not None else list(self._handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[key].shape)
        return tuple(self._handle.get_slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        if self._bin is not None:
            tensor = self._bin[key]
            return tensor[start:stop] if tensor.dim() else tensor
        part = self._handle.get_slice(key)
        return part[start:stop] if part.get_shape() else self._handle.get_tensor(key)


def _renamer(model):
    """transformers' renamings of older checkpoint keys for this model (``LayerNorm.gamma``,
    nested language-model prefixes): the same keys ``from_pretrained`` would accept."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping

        renames = [(re.compile(s), t) for rule in get_model_conversion_mapping(model)
                   for s, t in zip(getattr(rule, "source_patterns", ()), getattr(rule, "target_patterns", ()))]
    except (ImportError, TypeError, AttributeError):
        renames = []

    def rename(key: str, targets) -> str:
        for pattern, target in renames:
            if key not in targets and pattern.search(key):
                key = pattern.sub(target, key)
        return key

    return rename


def _flat_range(tensor) -> tuple[int, int]:
    """The elements of the flattened tensor this rank holds: its ZeRO-3 partition, or all."""
    if not hasattr(tensor, "ds_id"):
        return 0, tensor.numel()
    size = tensor.ds_tensor.ds_numel
    start = size * group_rank(tensor.ds_process_group)
    return start, min(start + size, tensor.ds_numel)


def _write(tensor, values: torch.Tensor, start: int, stop: int) -> None:
    """Elements [start, stop) of the flattened tensor into this rank's copy or partition."""
    destination = tensor.ds_tensor if hasattr(tensor, "ds_id") else tensor.data.view(-1)
    with torch.no_grad():
        destination.narrow(0, 0 if hasattr(tensor, "ds_id") else start, stop - start).copy_(values)


def _shape(tensor) -> tuple[int, ...]:
    return tuple(tensor.ds_shape) if hasattr(tensor, "ds_id") else tuple(tensor.shape)


def load_weights(model, checkpoint) -> LoadReport:
    """Fill ``model``'s parameters and persistent buffers from the checkpoint directory, each
    rank its own partitions (whole tensors where a tensor is not partitioned). Tied parameters
    are filled once. A tensor of another shape, or one the checkpoint lacks, is an error naming
    the key and the file; keys the model does not have are returned (transformers ignores them
    too: older checkpoints carry buffers such as ``position_ids``)."""
    began = time.perf_counter()
    targets = model.state_dict(keep_vars=True)
    rename = _renamer(model)
    files = weight_files(checkpoint)
    filled, unused, read = set(), [], 0
    for file in files:
        source = _Rows(file)
        for key in source.keys():
            name = rename(key, targets)
            if name not in targets:
                unused.append(key)
                continue
            tensor, shape = targets[name], source.shape(key)
            if shape != _shape(tensor):
                raise ValueError(f"{file}: {key} has shape {list(shape)}, the model's {name} has "
                                 f"{list(_shape(tensor))} (a checkpoint of another configuration?)")
            if id(tensor) in filled:
                continue
            start, stop = _flat_range(tensor)
            if stop > start:
                row = math.prod(shape[1:])
                first, last = start // row, -(-stop // row)
                rows = source.rows(key, first, last)
                read += rows.numel() * rows.element_size()
                offset = first * row
                _write(tensor, rows.reshape(-1)[start - offset: stop - offset], start, stop)
            filled.add(id(tensor))
        del source
    missing = sorted(name for name, tensor in targets.items() if id(tensor) not in filled)
    if missing:
        raise ValueError(f"{checkpoint}: the checkpoint lacks {len(missing)} of the model's tensors, e.g. "
                         f"{missing[:5]} (a checkpoint of another model?)")
    return LoadReport(len(files), read, time.perf_counter() - began, unused)


@contextlib.contextmanager
def uninitialised():
    """Build without drawing initial values: every one is overwritten by the checkpoint, and at
    billions of parameters the draws take minutes on every rank."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        yield

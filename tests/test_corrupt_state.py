"""Damaged adapter files are refused, naming the file: flipped bytes, truncation, an empty file,
non-finite values. Safetensors alone would load flipped payload bytes as silent NaNs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from aurora_ds import AuroraConfig, build_backbone, inject_aurora, load_adapter
from aurora_ds.aurora.io import CONFIG_FILE, WEIGHTS_FILE, file_digest

BACKBONE = "blip-tiny-retrieval"


@pytest.fixture()
def adapter(tmp_path):
    torch.manual_seed(0)
    handle = inject_aurora(build_backbone(BACKBONE), AuroraConfig(rank=4, backbone=BACKBONE))
    handle.save(tmp_path / "adapter")
    return tmp_path / "adapter"


def _load(directory):
    torch.manual_seed(0)
    return load_adapter(build_backbone(BACKBONE), directory)


def test_intact_adapter_loads_and_records_its_digest(adapter):
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    assert meta["files"][WEIGHTS_FILE] == file_digest(adapter / WEIGHTS_FILE)
    _load(adapter)


def test_flipped_bytes_of_the_same_size_are_refused(adapter):
    path = adapter / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 200, len(data)):  # payload bytes, as a bad disk or copy would
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*damaged"):
        _load(adapter)


@pytest.mark.parametrize("keep", [0, 100])
def test_truncated_or_empty_file_is_refused_naming_it(adapter, keep):
    path = adapter / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match=str(path)):
        _load(adapter)
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    del meta["files"]  # without a recorded digest the file itself must still fail loudly
    (adapter / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{path} is not a readable safetensors file"):
        _load(adapter)


def test_non_finite_values_are_refused_naming_the_tensor(adapter):
    from safetensors.torch import load_file

    path = adapter / WEIGHTS_FILE
    tensors = load_file(str(path))
    name = sorted(n for n, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, str(path))
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    meta["files"][WEIGHTS_FILE] = file_digest(path)  # a consistent file that holds NaNs
    (adapter / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"tensor {name} holds non-finite"):
        _load(adapter)

"""Damaged adapter files are refused, naming the file: flipped bytes, truncation, an empty file,
non-finite values, an edited config, a removed record. Safetensors alone would load flipped
payload bytes as silent NaNs."""

import json

import pytest
import torch
from safetensors.torch import save_file

from aurora_ds import AuroraConfig, build_backbone, inject_aurora, load_adapter
from aurora_ds.aurora.io import CONFIG_FILE, CONTENT_DIGEST, WEIGHTS_FILE, content_digest, file_digest

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
    del meta["files"], meta[CONTENT_DIGEST]  # an early format 2, with no digest: the file itself must still fail loudly
    (adapter / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 2}))
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
    meta[CONTENT_DIGEST] = content_digest(meta)
    (adapter / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"tensor {name} holds non-finite"):
        _load(adapter)


def _edit(adapter, change):
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    change(meta)
    (adapter / CONFIG_FILE).write_text(json.dumps(meta, indent=2))


def test_an_edited_config_value_is_refused_naming_the_file_and_key(adapter):
    """A changed ``aurora.scale`` would load and change every metric: the config's own digest refuses it."""
    _edit(adapter, lambda meta: meta["aurora"].update(scale=2.0))
    with pytest.raises(ValueError, match=rf"{adapter / CONFIG_FILE} was edited after it was written \(key 'aurora' "
                                         rf"differs, against the SHA-256 of each key recorded in {CONTENT_DIGEST}\)"):
        _load(adapter)
    _edit(adapter, lambda meta: meta.update(note="mine"))
    with pytest.raises(ValueError, match="key 'aurora' differs, key 'note' was added"):
        _load(adapter)


def test_a_removed_record_is_an_error_not_a_skipped_check(adapter):
    """Flipped bytes with the ``files`` record deleted (or the config's own digest deleted) are refused."""
    path = adapter / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-100:] = bytes(b ^ 0xFF for b in data[-100:])
    path.write_bytes(bytes(data))
    meta = json.loads((adapter / CONFIG_FILE).read_text())
    _edit(adapter, lambda m: m.pop("files"))
    with pytest.raises(ValueError, match=rf"{adapter / CONFIG_FILE} was edited .*key 'files' was removed"):
        _load(adapter)
    _edit(adapter, lambda m: m.pop(CONTENT_DIGEST))
    with pytest.raises(ValueError, match=rf"{adapter / CONFIG_FILE} has no valid {CONTENT_DIGEST} record .* adapter "
                                         "format 4 always writes"):
        _load(adapter)
    # Format 3 always wrote ``files`` but had no digest of its own content: the record is still required.
    _edit(adapter, lambda m: m.update(format_version=3))
    with pytest.raises(ValueError, match=rf"{adapter / CONFIG_FILE} records no size and SHA-256 of {WEIGHTS_FILE} "
                                         r"\(key 'files'\), which adapter format 3 always writes"):
        _load(adapter)
    _edit(adapter, lambda m: m.update(files=meta["files"]))
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        _load(adapter)


def test_format_3_adapters_without_a_content_digest_still_load(adapter):
    _edit(adapter, lambda meta: (meta.pop(CONTENT_DIGEST), meta.update(format_version=3)))
    _load(adapter)


"""Damaged adapter files are refused, naming the file: flipped bytes, truncation, an empty file,
non-finite values, an edited config, a removed record. Safetensors alone would load flipped
payload bytes as silent NaNs. Engine checkpoints likewise: every file must be recorded in the
``COMPLETE`` marker, present and intact, checked before the backbone is built."""

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


@pytest.fixture()
def checkpoint(tmp_path):
    """A checkpoint directory laid out as a DeepSpeed run writes it, marked complete."""
    from aurora_ds.engine.checkpoint import digest_files, mark_complete

    step = tmp_path / "out" / "checkpoints" / "step_000001"
    (step / "deepspeed" / "state").mkdir(parents=True)
    for name in ("zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        torch.save({"state": torch.ones(64)}, step / "deepspeed" / "state" / name)
    torch.save({"step": torch.tensor(1)}, step / "client_state.pt")
    (step / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 1}))
    mark_complete(step, digest_files(step))
    return step


OPTIM = "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_intact_checkpoint_passes_and_its_marker_is_written_atomically(checkpoint, monkeypatch):
    from aurora_ds.engine import checkpoint as ckpt

    ckpt.verify_checkpoint(checkpoint)
    assert sorted(json.loads((checkpoint / "COMPLETE").read_text())["files"]) == sorted(ckpt.digest_files(checkpoint))
    (checkpoint / "COMPLETE").unlink()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", crash)  # dies while writing the marker: no marker, never half a one
    with pytest.raises(OSError, match="disk full"):
        ckpt.mark_complete(checkpoint, ckpt.digest_files(checkpoint))
    assert not (checkpoint / "COMPLETE").exists()


@pytest.mark.parametrize("marker", ["", "{}", '{"tag": "step_000001", "files": {}}', "step_000001"])
def test_an_emptied_or_unreadable_marker_is_refused(checkpoint, marker):
    from aurora_ds.engine.checkpoint import verify_checkpoint

    (checkpoint / "COMPLETE").write_text(marker)
    with pytest.raises(ValueError, match=f"{checkpoint / 'COMPLETE'} is empty or unreadable .*: it must record the "
                                         "size and SHA-256 of every file"):
        verify_checkpoint(checkpoint)


def test_a_file_the_marker_does_not_record_is_refused_naming_it(checkpoint):
    """A damaged optimizer state whose entry was removed from COMPLETE is refused before it loads
    (it used to resume and die at its first step with a NaN naming no file)."""
    from aurora_ds.engine.checkpoint import verify_checkpoint

    path = checkpoint / OPTIM
    data = bytearray(path.read_bytes())
    data[-20:] = bytes(b ^ 0xFF for b in data[-20:])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        verify_checkpoint(checkpoint)
    marker = json.loads((checkpoint / "COMPLETE").read_text())
    del marker["files"][OPTIM]
    (checkpoint / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint} holds files its {checkpoint / 'COMPLETE'} does not "
                                         f"record: {OPTIM} "):
        verify_checkpoint(checkpoint)


@pytest.mark.parametrize("name", [OPTIM, "deepspeed/state/zero_pp_rank_0_mp_rank_00_model_states.pt", "COMPLETE"])
def test_resume_checks_the_checkpoint_before_the_backbone_is_built(checkpoint, name, monkeypatch):
    """A deleted optimizer or model shard is named at run setup, not by DeepSpeed's 'No such file'
    after the model is built; an emptied marker likewise."""
    from aurora_ds.engine import loop
    from aurora_ds.engine.config import build_config

    def built(*args):
        raise AssertionError("the backbone was built before the checkpoint was checked")

    monkeypatch.setattr(loop, "build_model", built)
    if name == "COMPLETE":
        (checkpoint / name).write_text("")
        error, match = ValueError, f"{checkpoint / name} is empty or unreadable"
    else:
        (checkpoint / name).unlink()
        error, match = FileNotFoundError, f"checkpoint {checkpoint} is missing {checkpoint / name}: its .*COMPLETE records it"
    cfg = build_config("", {"backbone.name": BACKBONE, "data.source": "synthetic", "engine.deepspeed": False,
                            "aurora.rank": 4, "output.dir": str(checkpoint.parents[1]), "output.resume": "auto"})
    with pytest.raises(error, match=match):
        loop.train(cfg)

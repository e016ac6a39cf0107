"""DeepSpeed silently ignores unknown keys (a misspelt ``zero_optimisation`` runs stage 0 and
crashes later) and gives bare errors for wrong types: ours name the key and the file."""

import json

import pytest

from aurora_ds.engine.dsconfig import resolve_ds_config, validate_ds_config


def _shipped(name="zero3"):
    ds = json.loads(resolve_ds_config(name).read_text())
    ds.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1, train_batch_size=2, gradient_clipping=0.0)
    ds["bf16"]["enabled"] = ds["fp16"]["enabled"] = False
    if ds["zero_optimization"].get("zero_hpz_partition_size") == "auto":  # GPUs per node, filled at launch
        ds["zero_optimization"]["zero_hpz_partition_size"] = 8
    return ds


@pytest.mark.parametrize("name", ["zero3", "zero3_offload", "zero2", "replicated", "zero3_hpz", "zero3_hpz_quant"])
def test_shipped_configs_validate(name):
    validate_ds_config(_shipped(name), name)


def test_misspelt_top_level_key_names_key_file_and_suggestion(tmp_path):
    ds = _shipped()
    ds["zero_optimisation"] = ds.pop("zero_optimization")
    with pytest.raises(ValueError, match=r"my.json: unknown DeepSpeed config key 'zero_optimisation' \(did you mean 'zero_optimization'\?\)"):
        validate_ds_config(ds, tmp_path / "my.json")


@pytest.mark.parametrize("section,key,value", [("zero_optimization", "stage", "three"),
                                               ("zero_optimization", "stage3_persistence_threshold", 0),
                                               ("fp16", "initial_scale_power", "big")])
def test_wrong_type_or_unknown_key_in_a_section_names_it(tmp_path, section, key, value):
    ds = _shipped()
    ds[section][key] = value
    with pytest.raises(ValueError, match=rf"my.json: {section}.{key}"):
        validate_ds_config(ds, tmp_path / "my.json")


def test_non_integer_batch_size_is_refused():
    ds = _shipped()
    ds["train_micro_batch_size_per_gpu"] = "2"
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu must be an integer"):
        validate_ds_config(ds, "cfg.json")

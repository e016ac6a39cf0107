"""DeepSpeed silently ignores unknown keys (a misspelt ``zero_optimisation`` runs stage 0 and
crashes later) and gives bare errors for wrong types: ours name the key and the file."""

import json
import re

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


@pytest.mark.parametrize("keys,value,expected", [
    (("zero_optimization", "stage"), True, "an integer"),  # was silently ZeRO stage 1: a bool is an int in Python
    (("zero_optimization", "stage"), "3", "an integer"),
    (("zero_optimization", "stage3_param_persistence_threshold"), True, "an integer"),
    (("zero_optimization", "stage3_max_live_parameters"), 1.5e8 + 0.5, "an integer"),
    (("zero_optimization", "overlap_comm"), "false", "true or false"),  # pydantic reads it as false
    (("zero_optimization", "offload_param"), {"device": "cpu", "pin_memory": 1}, "true or false"),
    (("bf16", "enabled"), 1, "true or false"),
    (("fp16", "loss_scale"), True, "a finite number"),
    (("train_micro_batch_size_per_gpu",), True, "an integer"),
    (("gradient_accumulation_steps",), False, "an integer"),
    (("gradient_clipping",), True, "a finite number"),
    (("gradient_clipping",), float("nan"), "a finite number"),  # Python's json reads NaN
    (("zero_allow_untested_optimizer",), "true", "true or false"),
])
def test_values_of_the_wrong_json_type_name_file_and_key(tmp_path, keys, value, expected):
    ds = _shipped()
    parent = ds
    for key in keys[:-1]:
        parent = parent[key]
    parent[keys[-1]] = value
    where = ".".join(keys) + (".pin_memory" if keys[-1] == "offload_param" else "")
    with pytest.raises(ValueError, match=rf"my.json: {re.escape(where)} must be {expected}, got "):
        validate_ds_config(ds, tmp_path / "my.json")


def test_whole_numbers_written_as_floats_are_integers():
    """JSON has one number type; the shipped configs write 1e8 where DeepSpeed reads an integer."""
    ds = _shipped()
    ds["zero_optimization"].update(stage=3.0, stage3_param_persistence_threshold=1e5)
    validate_ds_config(ds, "cfg.json")


def test_a_boolean_stage_in_a_config_file_fails_before_any_build(tmp_path):
    """Through the engine's entry point, with the file named (inputs.py adds the config key)."""
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.dsconfig import build_ds_config

    ds = json.loads(resolve_ds_config("zero3").read_text())
    ds["zero_optimization"]["stage"] = True
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(ds))
    cfg = build_config("", ["data.source=synthetic", f"engine.ds_config={path}"])
    with pytest.raises(ValueError, match=r"mine.json: zero_optimization.stage must be an integer, got true"):
        build_ds_config(str(path), cfg, 1)

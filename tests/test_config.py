"""The nested run configuration: sections, recipes, --set, errors, aurora-eval's own config."""

import json
import os

import pytest
import torch

from aurora_ds.aurora import AuroraConfig
from aurora_ds.backbones import PRECISIONS
from aurora_ds.engine.config import (SECTIONS, TrainConfig, build_config, known_keys,
                                     list_recipes, load_recipe, section_keys)


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_is_nested_and_builds(recipe):
    data = load_recipe(recipe)
    assert set(data) <= set(SECTIONS) and all(isinstance(v, dict) for v in data.values())
    cfg = build_config(recipe, ["data.source=synthetic"])
    assert cfg.recipe == recipe and isinstance(cfg.aurora, AuroraConfig)
    again = build_config("", base=json.loads(json.dumps(cfg.to_dict())))  # the recorded form reads back
    assert again == cfg


def test_aurora_section_is_the_adapter_config_and_ranks_are_mappings():
    cfg = build_config("", ["data.source=synthetic", "aurora.ranks={1408: 64, 768: 32}",
                            "aurora.tower_ranks={qformer: 16}", "aurora.targets=[a.*, b]", "backbone.name=blip-tiny-vqa",
                            "objective.task=qa"])
    assert cfg.aurora.ranks == {1408: 64, 768: 32} and cfg.aurora.tower_ranks == {"qformer": 16}
    assert cfg.aurora.targets == ["a.*", "b"]
    adapter = cfg.adapter_config()
    assert adapter.backbone == "blip-tiny-vqa" and not adapter.context_enhancement  # qa: no matching head
    assert adapter.rank_for(1408) == 64 and cfg.aurora.backbone is None
    yaml_cfg = build_config("", {"data": {"source": "synthetic"}, "aurora": {"ranks": {1408: 8}}})
    assert yaml_cfg.aurora.ranks == {1408: 8}
    assert "aurora.rank" in known_keys() and "aurora.backbone" not in known_keys()


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown config key 'optim.lrr' in --set; known keys of 'optim': ['batch_size'"),
    (["optimiser.lr=1"], "unknown config section 'optimiser' in --set; known sections: ['backbone', 'aurora'"),
    (["lr=1"], "--set expects section.key=value, got 'lr=1'"),
    (["optim.batch_size=x"], "config key 'optim.batch_size' expects int, got 'x'"),
    (["aurora.ranks=1408:64"], "config key 'aurora.ranks' expects a mapping"),
    (["aurora.ranks={wide: 64}"], "config key 'aurora.ranks[wide]' expects int"),
    (["aurora.ranks={1408: 0}"], "config section 'aurora': AuroraConfig.ranks[1408] must be a positive integer"),
    (["aurora.ranks.1408=64"], "set the whole mapping, e.g. aurora.ranks={1408: 64}"),
    (["engine.precision=fp8"], "engine.precision must be one of ('fp32', 'bf16', 'fp16'), got 'fp8'"),
    (["objective.alpha=2"], "objective.alpha must be in [0, 1]"),
    (["data.source=shards"], "data.train_shards is empty"),
    (["optim.clip_grad=-1"], "optim.clip_grad must be >= 0, got -1.0"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps must be >= 0, got -5"),
    (["optim.max_steps=-1"], "optim.max_steps must be >= 0"),
    (["eval.every=-2"], "eval.every must be >= 0, got -2"),
    (["output.keep_checkpoints=-1"], "output.keep_checkpoints must be >= 0, got -1"),
    (["output.save_every=-1"], "output.save_every must be >= 0"),
    (["output.log_every=0"], "output.log_every must be > 0, got 0"),
    (["data.num_workers=-1"], "data.num_workers must be >= 0"),
    (["engine.collective_timeout_s=0"], "engine.collective_timeout_s must be > 0"),
    (["data.caption_per_sample=each"], "data.caption_per_sample must be one of ('random', 'all'), got 'each'"),
    (["data.resampled=true"], "data.resampled=true needs data.train_num_samples"),
    (["data.train_num_samples=-1"], "data.train_num_samples must be >= 0"),
    (["data.max_member_mb=0"], "data.max_member_mb must be > 0, got 0.0"),
])
def test_errors_name_the_key_and_list_the_known_ones(overrides, message):
    with pytest.raises(ValueError) as e:
        build_config("", ["data.source=synthetic", *overrides] if "train_shards" not in message else overrides)
    assert message in str(e.value)


@pytest.mark.parametrize("recipe", list_recipes())
def test_recipes_count_epochs_as_the_paper(recipe):
    """BLIP's retrieval epoch is one pair per caption (its datasets list every caption); QA counts
    questions whatever the key says. The defaults keep OpenCLIP's one pair per image."""
    cfg = build_config(recipe, ["data.source=synthetic"])
    assert cfg.data.caption_per_sample == ("all" if cfg.objective.task == "retrieval" else "random")
    assert not cfg.data.resampled and cfg.data.train_num_samples == 0
    data = build_config("", ["data.source=synthetic", "data.resampled=true", "data.train_num_samples=1000"]).data
    assert data.resampled and data.train_num_samples == 1000 and build_config("", ["data.source=synthetic"]).data.caption_per_sample == "random"


def test_dict_overrides_and_recipe_errors(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'optim.lr'"):
        build_config("", {"lr": 1e-3})
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim: 3\n")
    with pytest.raises(ValueError, match="config section 'optim' in recipe .* must be a mapping"):
        build_config(str(recipe))


def test_one_precision_table():
    assert PRECISIONS == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    from aurora_ds.plan import BYTES_PER_PARAM

    assert BYTES_PER_PARAM == {"fp32": 4, "bf16": 2, "fp16": 2}


def test_train_cli_shortcuts_map_to_sections():
    from aurora_ds.train import config_from_args, parse_args

    cfg = config_from_args(parse_args(["--train-shards", "/t.tar", "--out", "/o", "--max-steps", "3", "--no-deepspeed",
                                       "--ds-config", "zero2", "--set", "optim.lr=0.5", "--eval-shards", "/v.tar",
                                       "--test-shards", "/x.tar"]))
    assert (cfg.data.eval_shards, cfg.data.test_shards) == ("/v.tar", "/x.tar")
    assert (cfg.data.train_shards, cfg.output.dir, cfg.optim.max_steps, cfg.engine.deepspeed, cfg.engine.ds_config,
            cfg.optim.lr) == ("/t.tar", "/o", 3, False, "zero2", 0.5)
    assert isinstance(cfg, TrainConfig)


def test_every_packaged_recipe_has_a_smoke_stand_in():
    from aurora_ds.engine.config import list_recipes
    from aurora_ds.recipes import SMOKE

    assert set(SMOKE) == set(list_recipes())


FLOAT_KEYS = [f"{s}.{k}" for s in SECTIONS for k, t in section_keys(s).items() if t is float]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_must_be_finite(key, value):
    """nan passes every range check (each comparison is false) and inf passes "> 0": optim.lr=nan
    was refused by the optimizer after the build, optim.lr=inf crashed at step 2."""
    assert {"optim.lr", "objective.temp", "aurora.dropout", "aurora.scale"} <= set(FLOAT_KEYS)
    with pytest.raises(ValueError, match=rf"config key '{key}' must be a finite number, got '{value}'"):
        build_config("", ["data.source=synthetic", f"{key}={value}"])
    with pytest.raises(ValueError, match=rf"config key '{key}' must be a finite number, got {value}"):
        build_config("", {"data.source": "synthetic", key: float(value)})  # a YAML .nan / .inf reads as this


def test_adapter_config_floats_must_be_finite():
    """Adapters are read back from JSON, which Python writes and reads NaN and Infinity in."""
    with pytest.raises(ValueError, match="AuroraConfig.scale must be a finite number, got inf"):
        AuroraConfig(scale=float("inf"))
    with pytest.raises(ValueError, match="AuroraConfig.gated_query_scale must be a finite number, got nan"):
        AuroraConfig.from_dict(json.loads('{"gated_query_scale": NaN}'))


def test_num_workers_is_checked_against_the_cpus_of_this_process(monkeypatch):
    """Loader workers are processes: more than the CPUs this process may use is an error naming the
    key and the count (data.num_workers=1000 forked 408 workers in 15 s); 8 on 16 is fine."""
    import aurora_ds.engine.config as config

    cpus = config.usable_cpus()
    assert cpus == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with pytest.raises(ValueError, match=rf"data.num_workers=1000 is more than the {cpus} CPU\(s\) this process may "
                                         rf"use: .*set data.num_workers to at most {cpus}"):
        build_config("", ["data.source=synthetic", "data.num_workers=1000"])
    monkeypatch.setattr(config, "usable_cpus", lambda: 16)
    assert build_config("", ["data.source=synthetic", "data.num_workers=8"]).data.num_workers == 8
    assert build_config("", ["data.source=synthetic", "data.num_workers=16"]).data.num_workers == 16
    with pytest.raises(ValueError, match=r"data.num_workers=17 is more than the 16 CPU"):
        build_config("", ["data.source=synthetic", "data.num_workers=17"])

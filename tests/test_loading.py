"""Loading a checkpoint into a model built partitioned (``backbones/loading.py``): each ZeRO-3
rank reads its own share of every shard file and holds the checkpoint's values; shapes, missing
tensors and broken indexes are errors naming the file and key."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from aurora_ds import build_backbone
from aurora_ds.backbones.loading import load_weights, uninitialised, weight_files
from aurora_ds.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
NAME = "blip2-opt-tiny-vqa"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny BLIP-2 OPT saved as bf16 safetensors in several shards, with its tied LM head."""
    path = tmp_path_factory.mktemp("ckpt") / "blip2-opt"
    torch.manual_seed(0)
    build_backbone(NAME, dtype=torch.bfloat16).save_pretrained(path, max_shard_size="200KB")
    assert len(weight_files(path)) >= 3
    return path


def _file_values(path) -> dict:
    values = {}
    for file in weight_files(path):
        values.update(load_file(str(file)))
    return values


def _empty(path, dtype=torch.bfloat16):
    config = transformers.Blip2Config.from_pretrained(path)
    with uninitialised():
        model = transformers.Blip2ForConditionalGeneration._from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def test_whole_model_gets_every_value_of_every_shard(sharded):
    model = _empty(sharded, torch.float32)
    report = load_weights(model, sharded)
    values, state = _file_values(sharded), model.state_dict()
    assert set(values) < set(state)  # the tied LM head is not in the files
    for key, value in values.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], value.float()), key
    assert torch.equal(state["language_model.lm_head.weight"], values["language_model.model.decoder.embed_tokens.weight"].float())
    assert report.files == len(weight_files(sharded)) and report.unused_keys == []
    assert report.read_bytes == sum(v.numel() * v.element_size() for v in values.values())


def test_a_pytorch_bin_checkpoint_is_read_memory_mapped(sharded, tmp_path):
    values = _file_values(sharded)
    torch.save(values, tmp_path / "pytorch_model.bin")
    model = _empty(sharded)
    assert load_weights(model, tmp_path).files == 1
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in values.items())


def test_older_key_names_are_renamed_as_transformers_does(sharded, tmp_path):
    """A checkpoint saved with the Q-Former's LayerNorms as gamma/beta (older BERT-style names)."""
    old = tmp_path / "old"
    old.mkdir()
    values = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in _file_values(sharded).items()}
    assert any(k.endswith("LayerNorm.gamma") for k in values)
    save_file(values, str(old / "model.safetensors"))
    model = _empty(sharded)
    load_weights(model, old)
    state = model.state_dict()
    key = next(k for k in state if k.endswith("LayerNorm.weight"))
    assert torch.equal(state[key], _file_values(sharded)[key])


def test_a_checkpoint_that_does_not_fit_is_named(sharded, tmp_path):
    values = _file_values(sharded)
    other = tmp_path / "other"
    other.mkdir()
    key = "language_projection.weight"
    save_file({**values, key: values[key][:, :-1].contiguous()}, str(other / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {key} has shape"):
        load_weights(_empty(sharded), other)
    lacking = tmp_path / "lacking"
    lacking.mkdir()
    save_file({k: v for k, v in values.items() if k != key}, str(lacking / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"lacks 1 of the model's tensors.*{key}"):
        load_weights(_empty(sharded), lacking)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {key: "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_weights(_empty(sharded), broken)
    with pytest.raises(FileNotFoundError, match="no weights"):
        weight_files(tmp_path)


RANKS = """
import json, sys, torch, deepspeed
from pathlib import Path
deepspeed.init_distributed()
from transformers.integrations import HfDeepSpeedConfig
from aurora_ds.backbones import build_backbone
from aurora_ds.dist import shutdown
from aurora_ds.engine.setup import release_shm_buffer
release_shm_buffer()

checkpoint, out, dtype = sys.argv[1], Path(sys.argv[2]), getattr(torch, sys.argv[3])
ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "train_micro_batch_size_per_gpu": 1,
      "bf16": {"enabled": dtype == torch.bfloat16}}  # zero.Init builds in the config's precision
keep = HfDeepSpeedConfig(ds)
model = build_backbone("%s", checkpoint, dtype)
params = dict(model.named_parameters())
# Blip2Attention makes qkv.bias after its Linear is built: a whole tensor, partitioned by the engine later
local = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in params.values())
values = {}
with deepspeed.zero.GatheredParameters(list(params.values())):
    for name, p in params.items():
        values[name] = p.detach().float().clone()
rank = torch.distributed.get_rank()
torch.save(values, out / f"values{rank}.pt")
(out / f"rank{rank}.json").write_text(json.dumps({
    "local": local, "total": sum(getattr(p, "ds_numel", p.numel()) for p in params.values()), "read": model.load_report.read_bytes,
    "dtypes": sorted({str(p.dtype) for p in params.values()}), "training": model.training,
    "eos": model.generation_config.eos_token_id,
    "tied": model.language_model.lm_head.weight is model.language_model.model.decoder.embed_tokens.weight}))
shutdown()
""" % NAME


@pytest.mark.distributed
def test_two_ranks_each_read_their_half_and_hold_the_checkpoint(sharded, tmp_path, dtype="bfloat16"):
    """Built under zero.Init from the sharded bf16 checkpoint on 2 ranks: each rank reads about
    half of the file bytes (its partitions, plus a row per tensor) and the gathered model is the
    checkpoint's, in the run's dtype, in eval mode, with its generation config."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script), str(sharded), str(tmp_path), dtype]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    values = _file_values(sharded)
    file_bytes = sum(v.numel() * v.element_size() for v in values.values())
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert 0.45 < report["local"] / report["total"] < 0.55
        assert 0.45 * file_bytes < report["read"] < 0.6 * file_bytes
        assert report["dtypes"] == [f"torch.{dtype}"] and report["training"] is False
        assert report["eos"] == build_backbone(NAME).generation_config.eos_token_id and report["tied"]
    for rank in (0, 1):
        gathered = torch.load(tmp_path / f"values{rank}.pt", weights_only=True)
        for key, value in values.items():
            assert torch.equal(gathered[key], value.float()), (rank, key)


def test_random_checkpoint_has_the_hub_layout(tmp_path):
    """``write_random_checkpoint`` (``aurora-bench load --write``) on the tiny BLIP-2 OPT: shards
    behind an index, OPT's tokenizer over the model's vocabulary, the processor configs."""
    from aurora_ds.bench.checkpoint import write_random_checkpoint

    checkpoint = write_random_checkpoint(NAME, tmp_path / "ckpt", torch.bfloat16, max_shard_bytes=200_000)
    assert len(weight_files(checkpoint)) >= 3
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (checkpoint / name).is_file(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (2, 1, 2)
    assert tokenizer("what color").input_ids[0] == 2 and len(tokenizer) == 1024  # the tiny OPT's vocabulary
    values = _file_values(checkpoint)
    assert {v.dtype for v in values.values()} == {torch.bfloat16}
    assert set(values) >= {n for n, _ in build_backbone(NAME).named_parameters() if "lm_head" not in n}


@pytest.mark.slow
@pytest.mark.distributed
def test_load_bench_measures_each_layout(tmp_path):
    """``aurora-bench load --write`` on the tiny BLIP-2 OPT: per layout each rank's loading time,
    bytes read and held, and the planner's figure beside them (the 3.7 B run in test_scaling.py
    asserts the same against the plan)."""
    from aurora_ds.bench.cli import main

    checkpoint = tmp_path / "ckpt"
    assert main(["load", "--backbone", NAME, "--checkpoint", str(checkpoint), "--write", "--max-shard-gb", "0.0002",
                 "--out", str(tmp_path / "out"), "--layouts", "zero3,replicated"]) == 0
    results = json.loads((tmp_path / "out" / "load.json").read_text())
    zero3, replicated = results["runs"]
    model_mb = zero3["model_mb"]
    for rank in zero3["ranks"]:
        assert 0.45 * model_mb < rank["read_mb"] < 0.6 * model_mb and 0.45 * model_mb < rank["held_mb"] < 0.6 * model_mb
    assert all(rank["read_mb"] is None and rank["held_mb"] == pytest.approx(model_mb) for rank in replicated["ranks"])
    assert zero3["plan_loading_mb"] > 0 and replicated["plan_mapped_mb"] == pytest.approx(model_mb)
    assert "| zero3 | 0 |" in (tmp_path / "out" / "load.md").read_text()

"""Self-describing adapters: an adapter records its run (backbone, task, checkpoint and tokenizer
identity, preprocessing, configuration) and carries its trained tokenizer and answer list, so
``aurora-eval --adapter DIR --shards SPEC`` needs nothing else; whatever contradicts the record
(another task or backbone, another checkpoint or tokenizer, a foreign run directory) is an error
naming both sides, raised before the backbone is built."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aurora_ds import AuroraConfig, build_backbone, inject_aurora, load_adapter
from aurora_ds.aurora.io import CONFIG_FILE, CONTENT_DIGEST, adapter_path, read_adapter_config, write_adapter
from aurora_ds.backbones import checkpoint_identity
from aurora_ds.backbones.tokenizer import tokenizer_identity, train_tokenizer
from aurora_ds.engine.adapter_record import AdapterRecord, check_checkpoint
from aurora_ds.engine.checkpoint import digest_files, mark_complete
from aurora_ds.engine.config import EvalRunConfig, build_config
from aurora_ds.engine.data import preprocessing
from aurora_ds.engine.loop import evaluate, train

ROOT = Path(__file__).resolve().parents[1]
NAME = "blip-tiny-retrieval"


def _adapter(directory, cfg, tokenizer_dir=None):
    """An adapter as a run with ``cfg`` saves it (values as initialised: the record is the point)."""
    torch.manual_seed(0)
    handle = inject_aurora(build_backbone(cfg.backbone.name), cfg.adapter_config())
    used = ("trained on data.train_shards", str(tokenizer_dir)) if tokenizer_dir else None
    record, files = AdapterRecord(cfg, 32, preprocessing(cfg), used, trained=used is not None).contents()
    write_adapter(directory, handle.adapter_state_dict(), handle.config, handle.describe(), {"step": 1}, record, files)
    return Path(directory)


@pytest.fixture()
def run(tiny_checkpoint, tmp_path):
    """A run directory with a trained tokenizer, a trainer_state.json and adapter_latest."""
    out = tmp_path / "run"
    cfg = build_config("coco_retrieval", {"backbone.name": NAME, "backbone.checkpoint": str(tiny_checkpoint),
                                          "data.source": "synthetic", "data.image_size": 32, "aurora.rank": 4,
                                          "output.dir": str(out)})
    train_tokenizer(["a photo of a cat", "a dog on a mat"], 1024, out / "tokenizer")
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    (out / "checkpoints" / "step_000001" / "trainer_state.json").write_text(json.dumps({"step": 1, "config": cfg.to_dict()}))
    return cfg, _adapter(out / "adapter_latest", cfg, out / "tokenizer")


def test_record_and_carried_files(run, tiny_checkpoint):
    cfg, adapter = run
    meta = read_adapter_config(adapter)
    assert meta["format_version"] == 4
    record = meta["run"]
    assert record["backbone"] == {"name": NAME, "family": "hf", "interface": "blip"}
    assert (record["task"], record["media"]) == ("retrieval", "image")
    assert record["checkpoint"] == checkpoint_identity(tiny_checkpoint)
    assert record["checkpoint"]["path"] == str(Path(tiny_checkpoint).resolve())
    assert record["tokenizer"] == {"source": "trained on data.train_shards", "trained": True,
                                   "sha256": tokenizer_identity(cfg.output.dir + "/tokenizer")}
    assert record["preprocessing"]["size"] == 32 and record["preprocessing"]["resample"] == "bicubic"
    assert record["config"] == cfg.to_dict()
    assert sorted(meta["files"]) == ["adapter.safetensors", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert tokenizer_identity(adapter_path(adapter, "tokenizer")) == record["tokenizer"]["sha256"]
    carried = adapter / "tokenizer" / "tokenizer.json"
    carried.write_text(carried.read_text().replace("photo", "phxto"))
    with pytest.raises(ValueError, match=f"{carried} is damaged"):
        adapter_path(adapter, "tokenizer")
    carried.unlink()
    with pytest.raises(FileNotFoundError, match=f"{carried} is missing"):
        adapter_path(adapter, "tokenizer")
    with pytest.raises(FileNotFoundError, match="carries no answer_list.json"):
        adapter_path(adapter, "answer_list.json")
    with pytest.raises(ValueError, match="not a plain relative name"):
        write_adapter(adapter.parent / "bad", {"x": torch.zeros(1)}, AuroraConfig(), {}, files={"../x": carried.parent})


def test_checkpoint_identity_follows_the_model_not_the_place(tiny_checkpoint, tmp_path):
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "moved")
    assert checkpoint_identity(moved)["sha256"] == checkpoint_identity(tiny_checkpoint)["sha256"]
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "projection_dim": 7}))
    assert checkpoint_identity(moved)["sha256"] != checkpoint_identity(tiny_checkpoint)["sha256"]
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    with open(other / "model.safetensors", "ab") as f:
        f.write(b"\0")
    assert checkpoint_identity(other)["sha256"] != checkpoint_identity(tiny_checkpoint)["sha256"]


def test_eval_config_from_the_adapter_alone(run, tmp_path):
    cfg, adapter = run
    lone = shutil.copytree(adapter, tmp_path / "shared" / "my_adapter")
    shutil.rmtree(cfg.output.dir)
    ev = EvalRunConfig(adapter=str(lone), shards="/s/{0..1}.tar", out=str(tmp_path / "e"), batch_size=4).run_config()
    assert ev.recipe == "coco_retrieval" and ev.backbone.name == NAME and ev.backbone.checkpoint == cfg.backbone.checkpoint
    assert ev.backbone.tokenizer == str(lone / "tokenizer") and ev.data.image_size == 32
    assert ev.aurora.rank == 4 and ev.eval.k_test == cfg.eval.k_test and ev.eval.batch_size == 4
    assert ev.data.eval_shards == "/s/{0..1}.tar" and ev.data.source == "shards" and ev.output.dir == str(tmp_path / "e")
    # an adapter without a record (format 2, or the Python API's handle.save) needs --recipe
    torch.manual_seed(0)
    inject_aurora(build_backbone(NAME), AuroraConfig(rank=8, backbone=NAME)).save(tmp_path / "api")
    with pytest.raises(ValueError, match="does not record the run that trained it.*give --recipe"):
        EvalRunConfig(adapter=str(tmp_path / "api"), shards="/s.tar").run_config()
    old = EvalRunConfig(adapter=str(tmp_path / "api"), shards="/s.tar", recipe="coco_retrieval", k_test=16).run_config()
    assert old.aurora.rank == 8 and old.backbone.name == NAME and old.eval.k_test == 16


def test_format_2_adapters_still_load(tmp_path):
    torch.manual_seed(0)
    handle = inject_aurora(build_backbone(NAME), AuroraConfig(rank=4, backbone=NAME))
    handle.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    del meta[CONTENT_DIGEST]  # format 2 had no digest of its own content
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 2}))
    torch.manual_seed(0)
    load_adapter(build_backbone(NAME), tmp_path / "a")
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 1}))
    with pytest.raises(ValueError, match=r"format_version 1; this version reads aurora formats \(2, 3, 4\)"):
        load_adapter(build_backbone(NAME), tmp_path / "a")
    # a real format-2 adapter with ICE has no evaluation context: refused, saying so
    from safetensors.torch import load_file, save_file

    from aurora_ds.aurora.io import WEIGHTS_FILE, file_digest

    weights = tmp_path / "a" / WEIGHTS_FILE
    buffers = [name for name, _ in handle.named_aurora_buffers()]
    assert buffers  # ICE is on in this preset
    save_file({n: t for n, t in load_file(str(weights)).items() if n not in buffers}, str(weights))
    files = {**meta["files"], WEIGHTS_FILE: file_digest(weights)}
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps({**meta, "format_version": 2, "files": files}))
    with pytest.raises(ValueError, match="is format 2, saved before ICE kept its evaluation context"):
        load_adapter(build_backbone(NAME), tmp_path / "a")


def _eval(adapter, tmp_path, *overrides, recipe=""):
    cfg = EvalRunConfig(adapter=str(adapter), shards=str(tmp_path / "none-{0..1}.tar"), out=str(tmp_path / "e"),
                        deepspeed=False, recipe=recipe, overrides=list(overrides)).run_config()
    return evaluate(cfg, str(adapter))


def test_evaluation_refuses_what_contradicts_the_record(run, tiny_checkpoint, tmp_path):
    """Each error names both sides, and comes before the backbone is built (the shards here do not exist)."""
    cfg, adapter = run
    with pytest.raises(ValueError, match=f"adapter {adapter} was trained for retrieval on image with backbone {NAME} "
                                         r"\(blip interface\); .* asks for qa on image with backbone blip-base-vqa"):
        _eval(adapter, tmp_path, recipe="vqa")
    with pytest.raises(ValueError, match="trained for retrieval on image .* asks for retrieval on video"):
        _eval(adapter, tmp_path, "data.media=video")
    other = shutil.copytree(tiny_checkpoint, tmp_path / "other")
    (other / "config.json").write_text(json.dumps({**json.loads((other / "config.json").read_text()), "projection_dim": 7}))
    want, got = checkpoint_identity(tiny_checkpoint)["sha256"], checkpoint_identity(other)["sha256"]
    with pytest.raises(ValueError, match=f"backbone.checkpoint={other} is not the checkpoint .* SHA-256 {got}, "
                                         f"the adapter recorded {want} for {Path(tiny_checkpoint).resolve()}"):
        _eval(adapter, tmp_path, f"backbone.checkpoint={other}")
    with pytest.raises(ValueError, match="set backbone.checkpoint=DIR to that checkpoint"):
        _eval(adapter, tmp_path, "backbone.checkpoint=")
    moved = shutil.copytree(tiny_checkpoint, tmp_path / "moved")
    check_checkpoint(read_adapter_config(adapter)["run"], build_config("", {"backbone.checkpoint": str(moved),
                                                                            "data.source": "synthetic"}), adapter)
    tokenizer = tmp_path / "tok"
    train_tokenizer(["another text entirely"], 1024, tokenizer)
    with pytest.raises(ValueError, match=f"backbone.tokenizer={tokenizer}: this tokenizer's files have SHA-256 "
                                         f"{tokenizer_identity(tokenizer)}, .* SHA-256 {tokenizer_identity(adapter / 'tokenizer')}"):
        _eval(adapter, tmp_path, f"backbone.tokenizer={tokenizer}")
    # a checkpoint copy whose preprocessor_config.json declares other pixels than training used
    (moved / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match=r"image preprocessing of backbone.checkpoint=.*moved \(preprocessor_config.json\) "
                                         r"is \{'mean': \[0.5, 0.5, 0.5\]"):
        _eval(adapter, tmp_path, f"backbone.checkpoint={moved}")


def test_a_run_directory_must_agree_with_the_adapter(run, tmp_path):
    cfg, adapter = run
    state = Path(cfg.output.dir) / "checkpoints" / "step_000001" / "trainer_state.json"
    data = json.loads(state.read_text())
    data["config"]["backbone"]["checkpoint"] = "/models/another"
    state.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"records backbone.checkpoint=.*but its run directory's {state} has "
                                         "'/models/another': the adapter belongs to another run"):
        _eval(adapter, tmp_path)
    state.unlink()
    train_tokenizer(["words of another run"], 1024, Path(cfg.output.dir) / "tokenizer")
    with pytest.raises(ValueError, match="carries a tokenizer .* other than its run directory's"):
        _eval(adapter, tmp_path)


def test_resuming_with_another_task_or_checkpoint_is_refused(run, tiny_checkpoint, tmp_path):
    cfg, adapter = run
    step = tmp_path / "out" / "checkpoints" / "step_000001"
    shutil.copytree(adapter, step / "adapter")
    mark_complete(step, digest_files(step))
    base = {"data.source": "synthetic", "engine.deepspeed": False, "output.dir": str(tmp_path / "out"),
            "output.resume": "auto", "aurora.rank": 4}
    with pytest.raises(ValueError, match=f"adapter {step / 'adapter'} was trained for retrieval on image with backbone "
                                         f"{NAME} .*; resuming it \\(output.resume=auto\\) asks for qa on image with "
                                         "backbone blip-tiny-vqa"):
        train(build_config("", {**base, "backbone.name": "blip-tiny-vqa", "objective.task": "qa"}))
    with pytest.raises(ValueError, match="was trained from checkpoint .*: set backbone.checkpoint=DIR"):
        train(build_config("", {**base, "backbone.name": NAME}))


@pytest.mark.distributed
def test_a_copied_adapter_evaluates_alone_as_in_its_run(tiny_checkpoint, tmp_path):
    """VQA (a tokenizer trained on the captions, an answer list) on the plain path: adapter_best
    copied away, the run directory deleted, the checkpoint moved; aurora-eval with the adapter
    and the shards alone gives the run's own evaluation of it."""
    from shard_tools.quickstart import sample_shards

    torch.manual_seed(0)
    build_backbone("blip-tiny-vqa").save_pretrained(tmp_path / "ckpt")
    data = sample_shards("vqa", 8, tmp_path / "raw", str(tmp_path / "shards"), seed=1, maxcount=3)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    small = ["backbone.name=blip-tiny-vqa", f"backbone.checkpoint={tmp_path / 'ckpt'}", "backbone.train_tokenizer=true",
             "aurora.rank=4",
             "optim.batch_size=4", "eval.batch_size=8", "data.image_size=32", "data.num_workers=1", "output.progress=false"]
    cmd = [sys.executable, "-m", "aurora_ds.train", "--no-deepspeed", "--recipe", "vqa", "--train-shards", data["train"],
           "--eval-shards", data["test"], "--out", str(out), "--max-steps", "2", *sum((["--set", s] for s in small), [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = json.loads((out / "eval" / "step_000002.json").read_text())
    lone = shutil.copytree(out / "adapter_best", tmp_path / "elsewhere" / "adapter")
    assert sorted(json.loads((lone / CONFIG_FILE).read_text())["files"]) == [
        "adapter.safetensors", "answer_list.json", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json"]
    assert (lone / "answer_list.json").read_bytes() == (out / "answer_list.json").read_bytes()
    shutil.rmtree(out)
    shutil.move(tmp_path / "ckpt", tmp_path / "moved")
    cmd = [sys.executable, "-m", "aurora_ds.evaluate", "--no-deepspeed", "--adapter", str(lone), "--shards", data["test"],
           "--out", str(tmp_path / "eval"), "--set", f"backbone.checkpoint={tmp_path / 'moved'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((tmp_path / "eval" / "eval" / "step_000002.json").read_text()) == expected

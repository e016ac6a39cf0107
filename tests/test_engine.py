"""The ZeRO-3 engine with real processes: equivalence, memory, multi-node, resume, bad input.

Runs use the tiny BLIP retrieval backbone, loaded from one saved checkpoint so that every run
starts from the same frozen weights, and synthetic batches that are identical for any number
of ranks (engine/synthetic.py).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aurora_ds import build_backbone
from aurora_ds.dist import free_port as _port
from aurora_ds.engine.config import build_config
from aurora_ds.engine.dsconfig import build_ds_config

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def unpartitioned_small_tensors_off(tmp_path_factory):
    """zero3.json with persistence 0: every tensor, the Aurora factors included, is partitioned."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("ds") / "zero3_p0.json"
    path.write_text(json.dumps(cfg))
    return path


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    return env


def _common(checkpoint, out, steps, *extra):
    args = ["--set", "data.source=synthetic", "--set", f"backbone.checkpoint={checkpoint}", "--set", "objective.queue_size=64",
            "--set", "aurora.rank=4", "--set", "output.progress=false", "--set", "output.log_every=1", "--max-steps", str(steps),
            "--out", str(out)]
    for item in extra:
        args += ["--set", item]
    return args


def _run(cmd, log: Path, timeout=300):
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{log.read_text()[-4000:]}"
    return log.read_text()


def local(n, args, log):
    """``launchers/local.sh N`` (the deepspeed launcher) on a free port."""
    return _run(["bash", "-c", f'MASTER_PORT={_port()} exec bash launchers/local.sh {n} "$@"', "_", *args], log)


def plain(args, log):
    return _run([PY, "-m", "aurora_ds.train", "--no-deepspeed", *args], log)


def _summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


# Same SGD run, micro-batch 2 on each of 2 ranks vs 4 in one process, 2-step accumulation,
# clipping, the full objective (ITC + distillation + queue, ITM with negatives from all ranks,
# ICE, GQT). SGD because Adam amplifies rounding noise on the ~1e-20 gradients of a
# zero-initialised V into full-size steps. Tolerance: 1e-5 of each tensor's own scale, room for the
# float32 reduction-order differences of gathers and all-reduces (observed ~1e-7 relative).
EQUIV = ("optim.optimizer=sgd", "optim.lr=0.05", "aurora.dropout=0", "optim.grad_accum=2", "optim.clip_grad=1.0")


@pytest.fixture(scope="module")
def equivalence_runs(tmp_path_factory, tiny_checkpoint, unpartitioned_small_tensors_off):
    tmp = tmp_path_factory.mktemp("equiv")
    local(2, _common(tiny_checkpoint, tmp / "ds2", 4, "optim.batch_size=2", *EQUIV)
          + ["--ds-config", str(unpartitioned_small_tensors_off)], tmp / "ds2.log")
    plain(_common(tiny_checkpoint, tmp / "plain", 4, "optim.batch_size=4", *EQUIV), tmp / "plain.log")
    (tmp / "backbone").write_text(str(tiny_checkpoint))
    return tmp


def _checkpoint_of(equivalence_runs):
    return (equivalence_runs / "backbone").read_text()


def test_two_rank_zero3_matches_single_process_reference(equivalence_runs):
    a = load_file(str(equivalence_runs / "plain" / "adapter_latest" / "adapter.safetensors"))
    b = load_file(str(equivalence_runs / "ds2" / "adapter_latest" / "adapter.safetensors"))
    assert set(a) == set(b) and any(k.startswith("aurora_factors.") for k in a)
    assert (a["aurora_factors.d32.up.V"] != 0).all(), "V never left its zero init: nothing was trained"
    for name in a:
        scale = a[name].abs().max().item()
        assert (a[name] - b[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name
    la = [h["loss"] for h in _summary(equivalence_runs / "plain")["history"]]
    lb = [h["loss"] for h in _summary(equivalence_runs / "ds2")["history"]]
    assert la == pytest.approx(lb, abs=1e-5)


def _assert_same_adapter(plain_out, ds_out):
    a = load_file(str(Path(plain_out) / "adapter_latest" / "adapter.safetensors"))
    b = load_file(str(Path(ds_out) / "adapter_latest" / "adapter.safetensors"))
    assert set(a) == set(b) and (a["aurora_factors.d32.up.V"] != 0).all()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-5 * a[name].abs().max().item() + 1e-9, name


def test_two_rank_zero3_with_persistent_small_tensors_matches_single_process_reference(equivalence_runs, tmp_path):
    """The shipped zero3.json (persistence threshold 1e5): the factors and the LayerNorm weights
    stay whole on every rank, so U's gradient is computed from the LayerNorms' saves here too (with
    threshold 0 those weights are partitioned and x is kept). Same SGD run, same factors."""
    out = tmp_path / "persistent2"
    local(2, _common(_checkpoint_of(equivalence_runs), out, 4, "optim.batch_size=2", *EQUIV)
          + ["--ds-config", str(ROOT / "ds_configs" / "zero3.json")], tmp_path / "persistent2.log")
    assert _summary(out)["ds_config"] != "replicated"
    _assert_same_adapter(equivalence_runs / "plain", out)
    la = [h["loss"] for h in _summary(equivalence_runs / "plain")["history"]]
    assert la == pytest.approx([h["loss"] for h in _summary(out)["history"]], abs=1e-5)


def test_two_rank_replicated_auto_layout_matches_single_process_reference(equivalence_runs, tmp_path):
    """``--ds-config auto`` picks the replicated layout for the tiny backbone (it fits whole): the
    backbone is built unpartitioned (no HfDeepSpeedConfig), ZeRO stage 2 holds the Aurora states;
    the same SGD run as the ZeRO-3 one ends with the same factors as the plain reference. Its
    checkpoint at step 2 resumes to the same steps 3-4."""
    out = tmp_path / "rep2"
    log = local(2, _common(_checkpoint_of(equivalence_runs), out, 4, "optim.batch_size=2", "output.save_every=2",
                           "output.keep_checkpoints=5", *EQUIV) + ["--ds-config", "auto"], tmp_path / "rep2.log")
    assert "--ds-config auto: replicated" in log
    summary = _summary(out)
    assert summary["ds_config"] == "replicated"
    # replicated: every rank holds the whole model
    assert summary["local_parameter_bytes"] == 4 * summary["parameters"]["total"]
    _assert_same_adapter(equivalence_runs / "plain", out)
    la = [h["loss"] for h in _summary(equivalence_runs / "plain")["history"]]
    assert la == pytest.approx([h["loss"] for h in summary["history"]], abs=1e-5)
    resumed = tmp_path / "resumed"
    local(2, _common(_checkpoint_of(equivalence_runs), resumed, 4, "optim.batch_size=2", *EQUIV)
          + ["--ds-config", "replicated", "--resume", str(out / "checkpoints" / "step_000002")], tmp_path / "resume.log")
    history = _summary(resumed)["history"]  # the whole run: steps 1-2 from the checkpoint, 3-4 resumed
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in summary["history"]], abs=1e-6)
    _assert_same_adapter(out, resumed)


def test_blip2_two_rank_zero3_matches_single_process_reference(tmp_path, unpartitioned_small_tensors_off):
    """BLIP-2 under ZeRO-3 with every tensor partitioned: the root-level query tokens, factor
    sets of three widths with layers between them, and a Q-Former tower with its own sets (one
    of them U only). Same SGD run as above, ITC over the global batch + ITM."""
    checkpoint = tmp_path / "blip2-tiny"
    torch.manual_seed(0)
    model = build_backbone("blip2-tiny-retrieval")
    # The Q-Former's own dropout (0.1) draws differently in 1 and 2 processes: off for equality.
    model.config.qformer_config.hidden_dropout_prob = model.config.qformer_config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(checkpoint)
    extra = ("backbone.name=blip2-tiny-retrieval", "aurora.tower_ranks={qformer: 3}", "objective.distill=false", *EQUIV)
    local(2, _common(checkpoint, tmp_path / "ds2", 3, "optim.batch_size=2", *extra)
          + ["--ds-config", str(unpartitioned_small_tensors_off)], tmp_path / "ds2.log")
    plain(_common(checkpoint, tmp_path / "plain", 3, "optim.batch_size=4", *extra), tmp_path / "plain.log")
    a = load_file(str(tmp_path / "plain" / "adapter_latest" / "adapter.safetensors"))
    b = load_file(str(tmp_path / "ds2" / "adapter_latest" / "adapter.safetensors"))
    assert {"aurora_factors.d208.up.V", "aurora_factors.qformer_d48.down.U", "aurora_factors.qformer_d32.up.V"} <= set(a)
    assert "aurora_factors.qformer_d48.up.V" not in a
    assert set(a) == set(b)
    for name in ("aurora_factors.d48.up.V", "aurora_factors.d208.up.V", "aurora_factors.qformer_d32.up.V"):
        assert (a[name] != 0).any(), f"{name} never left its zero init"
    for name in a:
        # A projection's bias gradient is a near-cancelling sum (normalised features, ITC over
        # gathered rows): measured against its weight's scale (observed 2e-7 of it).
        related = [a[n].abs().max().item() for n in (name, name.replace(".bias", ".weight")) if n in a]
        assert (a[name] - b[name]).abs().max().item() <= 1e-5 * max(related) + 1e-9, name
    la = [h["loss"] for h in _summary(tmp_path / "plain")["history"]]
    lb = [h["loss"] for h in _summary(tmp_path / "ds2")["history"]]
    assert la == pytest.approx(lb, abs=1e-5)
    meta = json.loads((tmp_path / "ds2" / "adapter_latest" / "adapter_config.json").read_text())
    assert meta["factor_sets"]["qformer_d48"] == {"parts": ["down"], "rank": 3, "width": 48}
    summary = _summary(tmp_path / "ds2")
    held = summary["local_parameter_bytes"] / (4 * summary["parameters"]["total"])
    assert 0.45 < held < 0.55, held  # each rank holds half of everything, queries included


def test_runs_leave_no_shared_memory_behind(tiny_checkpoint, tmp_path):
    """DeepSpeed's CPU allreduce maps a 66 MB /dev/shm file per rank and never removes it."""
    port = _port()
    _run(["bash", "-c", f'MASTER_PORT={port} exec bash launchers/local.sh 2 "$@"', "_",
          *_common(tiny_checkpoint, tmp_path / "run", 1, "optim.batch_size=2")], tmp_path / "run.log")
    left = list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert not left, left


def test_two_ranks_hold_half_the_backbone_each(equivalence_runs, tiny_checkpoint, unpartitioned_small_tensors_off, tmp_path):
    local(1, _common(tiny_checkpoint, tmp_path / "ds1", 1, "optim.batch_size=2")
          + ["--ds-config", str(unpartitioned_small_tensors_off)], tmp_path / "ds1.log")
    one = _summary(tmp_path / "ds1")["local_parameter_bytes"]
    two = _summary(equivalence_runs / "ds2")["local_parameter_bytes"]
    assert 0.45 < two / one < 0.55, (one, two)


def _launch_two_nodes(args, per_node: int, tmp_path, timeout: int):
    """``launchers/multinode.sh`` as node 0 and node 1 of 2 on 127.0.0.1 (no ssh), ``per_node``
    ranks each; both must exit 0 (their logs, node0.log and node1.log, fail the test otherwise)."""
    env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()))
    procs = [subprocess.Popen(["bash", "launchers/multinode.sh", "node", str(r), "2", str(per_node), *args], cwd=ROOT,
                              env=env, stdout=open(tmp_path / f"node{r}.log", "w"), stderr=subprocess.STDOUT)
             for r in (0, 1)]
    codes = [p.wait(timeout=timeout) for p in procs]
    logs = [(tmp_path / f"node{r}.log").read_text() for r in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]


def test_two_node_launch_on_one_machine(tiny_checkpoint, tmp_path):
    """Two launcher processes (node ranks 0 and 1, no ssh) on 127.0.0.1 train and checkpoint."""
    args = _common(tiny_checkpoint, tmp_path / "out", 2, "optim.batch_size=2")
    _launch_two_nodes(args, 1, tmp_path, timeout=300)
    summary = _summary(tmp_path / "out")
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (tmp_path / "out" / "checkpoints" / "step_000002" / "COMPLETE").exists()
    assert (tmp_path / "out" / "adapter_latest" / "adapter.safetensors").exists()


@pytest.mark.slow
def test_hpz_on_two_nodes_matches_single_process_reference(tiny_checkpoint, tmp_path):
    """ZeRO++ hierarchical partitioning (``zero3_hpz``, every tensor partitioned) on 2 launcher
    "nodes" of 2 ranks on 127.0.0.1: hpZ needs 2+ ranks per node (DeepSpeed turns it off at a
    partition size of 1), so 4 ranks. The same SGD run as the ZeRO-3 equivalence, micro-batch 2
    on each of 4 ranks against 8 in one process, ends with the same factors and losses."""
    cfg = json.loads((ROOT / "ds_configs" / "zero3_hpz.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config = tmp_path / "zero3_hpz_p0.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "hpz"
    args = _common(tiny_checkpoint, out, 4, "optim.batch_size=2", *EQUIV) + ["--ds-config", str(config)]
    _launch_two_nodes(args, 2, tmp_path, timeout=600)
    summary = _summary(out)
    assert summary["world_size"] == 4
    held = summary["local_parameter_bytes"] / (4 * summary["parameters"]["total"])
    assert 0.2 < held < 0.3, held  # the primary partition: a quarter of everything per rank
    # hpZ is on: a secondary partition over the node's 2 ranks, half of everything per rank
    secondary = summary["secondary_parameter_bytes"] / (4 * summary["parameters"]["total"])
    assert 0.45 < secondary < 0.55, secondary
    plain(_common(tiny_checkpoint, tmp_path / "plain", 4, "optim.batch_size=8", *EQUIV), tmp_path / "plain.log")
    _assert_same_adapter(tmp_path / "plain", out)
    la = [h["loss"] for h in _summary(tmp_path / "plain")["history"]]
    assert la == pytest.approx([h["loss"] for h in summary["history"]], abs=1e-5)


def test_killed_run_resumes_exactly(tiny_checkpoint, tmp_path):
    extra = ("optim.batch_size=2", "output.save_every=2", "output.keep_checkpoints=10", "optim.lr=1e-3", "optim.warmup_steps=2")
    full = tmp_path / "full"
    local(2, _common(tiny_checkpoint, full, 6, *extra), tmp_path / "full.log")
    expected = _summary(full)["history"]

    out = tmp_path / "killed"
    cmd = ["bash", "-c", f'MASTER_PORT={_port()} exec bash launchers/local.sh 2 "$@"', "_",
           *_common(tiny_checkpoint, out, 6, *extra)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=open(tmp_path / "killed.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / "checkpoints" / "step_000002" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), (tmp_path / "killed.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Whatever the run wrote after step 2 is dropped, and a half-written checkpoint is planted:
    # --resume auto must take step 2 and ignore the incomplete one.
    for later in (out / "checkpoints").glob("step_*"):
        if later.name != "step_000002":
            subprocess.run(["rm", "-rf", str(later)], check=True)
    (out / "checkpoints" / "step_000004").mkdir()
    (out / "checkpoints" / "step_000004" / "client_state.pt").write_bytes(b"partial")

    log = local(2, _common(tiny_checkpoint, out, 6, *extra) + ["--resume", "auto"], tmp_path / "resume.log")
    assert "resumed from" in log and "step_000002" in log
    resumed = _summary(out)["history"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]  # the summary covers the whole run
    for got, want in zip(resumed, expected):
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), (got, want)

    # On another number of ranks the optimizer state cannot be re-partitioned: restart from the
    # checkpoint's adapter with a fresh optimizer, and say so.
    log = local(1, _common(tiny_checkpoint, out, 7, "optim.batch_size=4", "output.save_every=2", "optim.lr=1e-3")
                + ["--resume", "auto"], tmp_path / "reshard.log")
    assert "written by 2 ranks, this run has 1" in log and "fresh optimizer" in log
    assert [h["step"] for h in _summary(out)["history"]] == [1, 2, 3, 4, 5, 6, 7]


# ---- bad input: clear errors before any work -------------------------------------------------


def _cli_error(args):
    proc = subprocess.run([PY, "-m", "aurora_ds.train", *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    return proc.stderr


def test_no_recipe_says_the_defaults_apply(tmp_path):
    err = _cli_error(["--no-deepspeed", "--train-shards", str(tmp_path / "none.tar"), "--out", str(tmp_path / "run")])
    assert "no --recipe: every key not given takes its default (backbone.name=blip-tiny-retrieval" in err
    assert "data.train_shards" in err and "none.tar" in err  # and the run still stops on its input
    recipe = _cli_error(["--recipe", "coco_retrieval", "--no-deepspeed", "--train-shards", str(tmp_path / "none.tar")])
    assert "no --recipe" not in recipe


def test_unknown_key_and_bad_values_are_refused(tmp_path):
    err = _cli_error(["--set", "aurora.rnak=3", "--set", "data.source=synthetic"])
    assert "unknown config key 'aurora.rnak'" in err and "'rank', 'ranks'" in err
    assert "rank must be a positive integer, got 0" in _cli_error(["--set", "aurora.rank=0", "--set", "data.source=synthetic"])
    assert "'optim.batch_size' expects int, got 'x'" in _cli_error(["--set", "optim.batch_size=x", "--set", "data.source=synthetic"])
    assert "unknown recipe 'cocoo'" in _cli_error(["--recipe", "cocoo"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(ValueError, match=f"unknown config key 'optim.lrr' in recipe '{recipe}'"):
        build_config(str(recipe), ["data.source=synthetic"])


def test_missing_backbone_checkpoint_and_resume_dirs(tmp_path):
    err = _cli_error(["--no-deepspeed", "--set", "data.source=synthetic", "--set", f"backbone.checkpoint={tmp_path / 'nope'}"])
    assert f"checkpoint directory {tmp_path / 'nope'} for backbone 'blip-tiny-retrieval' does not exist" in err
    err = _cli_error(["--no-deepspeed", "--set", "data.source=synthetic", "--resume", str(tmp_path / "gone")])
    assert f"checkpoint directory {tmp_path / 'gone'} does not exist" in err


# The real CLI with a hook that announces the backbone build: a bad input must stop the run
# before it, with an error naming the key and the path.
HOOKED_TRAIN = """
import sys
import aurora_ds.engine.loop as loop
build = loop.build_model
def announced(*args, **kwargs):
    print("BACKBONE BUILT", flush=True)
    return build(*args, **kwargs)
loop.build_model = announced
from aurora_ds.train import main
main(sys.argv[1:])
"""


def _bad_input(tmp_path, case):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "s-0.tar", "w") as tar:
        info = tarfile.TarInfo("a.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    train, extra = str(shards / "s-0.tar"), []
    if case == "missing shard":
        train = str(shards / "s-{0..1}.tar")
        return train, extra, "data.train_shards", shards / "s-1.tar"
    if case == "missing checkpoint":
        return train, ["--set", f"backbone.checkpoint={tmp_path / 'nope'}"], "backbone.checkpoint", tmp_path / "nope"
    bad = tmp_path / "bad_ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": "three"}}))
    return train, ["--ds-config", str(bad)], "engine.ds_config", bad


@pytest.mark.parametrize("case", ["missing shard", "missing checkpoint", "bad ds config"])
def test_bad_input_stops_the_run_before_the_backbone_is_built(tmp_path, case):
    train, extra, key, path = _bad_input(tmp_path, case)
    proc = subprocess.run([PY, "-c", HOOKED_TRAIN, "--train-shards", train, "--out", str(tmp_path / "run"),
                           "--set", "output.progress=false", *extra], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "BACKBONE BUILT" not in out, out[-3000:]
    assert key in out and str(path) in out, out[-3000:]


def test_ds_config_contradicting_the_recipe(tmp_path):
    cfg = build_config("", {"data.source": "synthetic", "optim.batch_size": 2})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu is 3 but the recipe needs 2"):
        build_ds_config(str(bad), cfg, 1)
    bad.write_text(json.dumps({"train_batch_size": 5}))
    with pytest.raises(ValueError, match=r"train_batch_size is 5 but the recipe needs 4 \(= batch_size 2 x grad_accum 1 x world size 2\)"):
        build_ds_config(str(bad), cfg, 2)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ValueError, match="remove the 'optimizer' section"):
        build_ds_config(str(bad), cfg, 1)
    with pytest.raises(FileNotFoundError, match="shipped configs"):
        build_ds_config("zero9", cfg, 1)
    filled = build_ds_config("zero3", build_config("", {"data.source": "synthetic", "optim.batch_size": 2, "optim.grad_accum": 3,
                                                          "engine.precision": "bf16", "optim.clip_grad": 1.0}), 4)
    assert filled["train_batch_size"] == 24 and filled["bf16"]["enabled"] and not filled["fp16"]["enabled"]
    assert filled["gradient_clipping"] == 1.0 and filled["zero_optimization"]["stage"] == 3
    with pytest.raises(ValueError, match=r"offload_param.nvme_path '/local_nvme' is not a directory"):
        build_ds_config("zero3_offload_nvme", cfg, 1)
    nvme = json.loads((ROOT / "ds_configs" / "zero3_offload_nvme.json").read_text())
    nvme["zero_optimization"]["offload_param"]["nvme_path"] = str(tmp_path)
    (tmp_path / "nvme.json").write_text(json.dumps(nvme))
    assert build_ds_config(str(tmp_path / "nvme.json"), cfg, 1)["zero_optimization"]["offload_param"]["device"] == "nvme"


def test_tensorboard_has_every_term(equivalence_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(equivalence_runs / "ds2" / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {"train/loss", "train/itc", "train/itm", "train/lr", "train/samples_per_s", "train/data_wait_s",
            "train/peak_memory_mb", "train/epoch"}
    assert want <= tags, want - tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("backbone", ["blip-tiny-retrieval", "blip2-tiny-retrieval"])
def test_bf16_with_activation_checkpointing_on_two_ranks(tiny_checkpoint, tmp_path, backbone):
    out = tmp_path / "bf16"
    if backbone == "blip-tiny-retrieval":
        checkpoint = tiny_checkpoint
    else:
        torch.manual_seed(0)
        checkpoint = tmp_path / "blip2-tiny"
        build_backbone(backbone).save_pretrained(checkpoint)
    local(2, _common(checkpoint, out, 2, "optim.batch_size=2", "engine.precision=bf16", "engine.activation_checkpointing=true",
                     "optim.lr=1e-3", f"backbone.name={backbone}"), tmp_path / "bf16.log")
    summary = _summary(out)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in summary["history"])
    tensors = load_file(str(out / "adapter_latest" / "adapter.safetensors"))
    # Trained in bf16; ICE's running context stays fp32 (+ its step count, an integer).
    assert {n: t.dtype for n, t in tensors.items() if t.is_floating_point() and t.dtype != torch.bfloat16} == {
        "aurora_context.running_context": torch.float32}
    assert tensors["aurora_context.running_context"].abs().sum() > 0
    assert (tensors["aurora_factors.d32.up.V"] != 0).any()


TIMM_ZERO3 = """
import sys, torch, deepspeed
from pathlib import Path
from safetensors.torch import load_file
deepspeed.init_distributed()
from aurora_ds import AuroraConfig, build_backbone, inject_aurora
from aurora_ds.dist import shutdown
from aurora_ds.engine.setup import release_shm_buffer
release_shm_buffer()

ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
      "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}
model = build_backbone("eva-tiny", checkpoint=sys.argv[1], dtype=torch.bfloat16, zero3=ds)
params = dict(model.named_parameters())
local = sum(p.ds_tensor.numel() for p in params.values())
total = sum(p.ds_numel for p in params.values())
assert 0.45 < local / total < 0.55, (local, total)
assert {p.dtype for p in params.values()} == {torch.bfloat16}
state = load_file(str(Path(sys.argv[1]) / "model.safetensors"))
with deepspeed.zero.GatheredParameters(list(params.values())):
    for name, p in params.items():
        assert torch.equal(p.float(), state[name].bfloat16().float()), name
inject_aurora(model, AuroraConfig(rank=4, backbone="eva-tiny"))
engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                  config={**ds, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
                                          "zero_allow_untested_optimizer": True})
loss = engine(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).float().pow(2).mean()
engine.backward(loss)
engine.step()
assert torch.isfinite(loss)
(Path(sys.argv[2]) / f"ok{torch.distributed.get_rank()}").write_text(f"{local} {total}")
shutdown()  # a process group left to the interpreter's exit can abort there (a joinable thread)
"""


def test_timm_tower_built_partitioned_in_bf16_on_two_ranks(tmp_path):
    """A timm tower (the Python API path): built under zero.Init from a checkpoint directory,
    half of it on each rank, bf16, the checkpoint's values, one DeepSpeed step."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    (tmp_path / "eva").mkdir()
    save_file(build_backbone("eva-tiny").state_dict(), str(tmp_path / "eva" / "model.safetensors"))
    script = tmp_path / "timm_zero3.py"
    script.write_text(TIMM_ZERO3)
    port = _port()
    log = _run([PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                str(script), str(tmp_path / "eva"), str(tmp_path)], tmp_path / "timm.log")
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists(), log[-3000:]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    with pytest.raises(ValueError, match="HfDeepSpeedConfig"):
        build_backbone("blip-tiny-retrieval", zero3={"zero_optimization": {"stage": 3}})


@pytest.mark.parametrize("name,forget", [("plain_state.pt", False), ("rank_00000.pt", False), ("client_state.pt", False),
                                         ("adapter/adapter.safetensors", False), ("plain_state.pt", True)])
def test_resume_refuses_a_damaged_checkpoint_file_naming_it(tiny_checkpoint, tmp_path, name, forget):
    """``forget``: the damaged file's entry is also removed from COMPLETE, which must not skip its check."""
    out = tmp_path / "out"
    plain(_common(tiny_checkpoint, out, 1, "output.save_every=1"), tmp_path / "first.log")
    step = out / "checkpoints" / "step_000001"
    damaged = step / name
    data = bytearray(damaged.read_bytes())
    data[-10:] = bytes(b ^ 0xFF for b in data[-10:])  # same size, different bytes
    damaged.write_bytes(bytes(data))
    if forget:
        marker = json.loads((step / "COMPLETE").read_text())
        del marker["files"][name]
        (step / "COMPLETE").write_text(json.dumps(marker))
    proc = subprocess.run([PY, "-m", "aurora_ds.train", "--no-deepspeed", *_common(tiny_checkpoint, out, 2), "--resume", "auto"],
                          capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    said = f"holds files its {step / 'COMPLETE'} does not record: {name} " if forget else f"{damaged} is damaged"
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-2000:]

"""aurora-plan: memory estimates checked against hand computation and DeepSpeed's estimator.

Backbones are built on the meta device, so even the 1 B-parameter ViT-g costs no memory.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

from aurora_ds.plan import MAX_LIVE_PARAMETERS, main, plan

BLIP = "blip-base-retrieval"
BACKBONE = 223_744_258  # parameter_report()["backbone"]
AURORA = 125_721  # parameter_report()["aurora"] at rank 32
LARGEST = 30524 * 768  # BLIP's word embedding, the largest single module


def test_counts_match_parameter_report():
    p = plan(BLIP, [8])[0]["params"]
    assert (p["backbone"], p["aurora"], p["total"]) == (BACKBONE, AURORA, BACKBONE + AURORA)
    assert p["largest_layer"] == LARGEST
    # Every Aurora tensor is below the persistence threshold at rank 32 (the core is 32**3).
    assert p["aurora_persistent"] == AURORA
    assert 0 < p["backbone_persistent"] < 0.002 * BACKBONE


def test_aurora_estimate_by_hand_without_persistence():
    """Threshold 0 partitions everything: the numbers follow from parameter_report alone."""
    a = plan(BLIP, [8], precision="bf16", persistence_threshold=0)[0]["aurora"]
    assert a["backbone_gpu_bytes"] == int(2 * BACKBONE / 8)
    # ZeRO-3 may keep up to stage3_max_live_parameters (1e8) gathered; BLIP-base's largest layer
    # and the next one prefetched are fewer.
    assert a["working_set_gpu_bytes"] == 2 * MAX_LIVE_PARAMETERS > 2 * 2 * LARGEST
    assert a["aurora_states_gpu_bytes"] == int(2 * AURORA / 8 + 16 * AURORA / 8)
    assert a["gpu_bytes"] == int(2 * BACKBONE / 8 + 2 * MAX_LIVE_PARAMETERS + 18 * AURORA / 8)
    assert a["cpu_bytes_per_node"] == 0


def test_aurora_estimate_by_hand_default_threshold():
    """Small tensors (all Aurora factors, biases, norms) are whole on every GPU."""
    row = plan(BLIP, [16], precision="fp32")[0]
    pb, a = row["params"]["backbone_persistent"], row["aurora"]
    assert a["backbone_gpu_bytes"] == int(4 * pb + 4 * (BACKBONE - pb) / 16)
    assert a["aurora_states_gpu_bytes"] == int(4 * AURORA + 16 * AURORA / 16)
    assert a["working_set_gpu_bytes"] == 4 * MAX_LIVE_PARAMETERS


def test_more_gpus_less_memory_per_gpu():
    rows = plan(BLIP, [1, 8, 16, 64])
    for key in ("aurora", "deepspeed_full_training"):
        gpu = [r[key]["gpu_bytes"] for r in rows]
        assert gpu == sorted(gpu, reverse=True) and len(set(gpu)) == 4
    # Aurora trains 0.06 % of the parameters: far below full training on one GPU.
    assert rows[0]["aurora"]["gpu_bytes"] < rows[0]["deepspeed_full_training"]["gpu_bytes"] / 5


def test_offload_moves_backbone_partition_to_cpu():
    on, off = plan(BLIP, [16], nodes=2, offload=True)[0], plan(BLIP, [16], nodes=2)[0]
    pb = on["params"]["backbone_persistent"]
    assert on["aurora"]["backbone_gpu_bytes"] == 2 * pb
    assert on["aurora"]["cpu_bytes_per_node"] == int(2 * (BACKBONE - pb) / 2)
    assert off["aurora"]["cpu_bytes_per_node"] == 0
    assert on["aurora"]["gpu_bytes"] < off["aurora"]["gpu_bytes"]
    assert on["aurora"]["working_set_gpu_bytes"] == off["aurora"]["working_set_gpu_bytes"]


@pytest.mark.parametrize("gpus,nodes,offload", [(1, 1, False), (16, 2, False), (64, 8, True)])
def test_deepspeed_estimate_is_the_estimator(gpus, nodes, offload):
    ds = plan(BLIP, [gpus], nodes=nodes, offload=offload)[0]["deepspeed_full_training"]
    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        BACKBONE + AURORA, LARGEST, num_gpus_per_node=gpus // nodes, num_nodes=nodes,
        cpu_offload=offload, cpu_offload_params=offload, zero_init=True, additional_buffer_factor=1.5,
    )
    assert (ds["cpu_bytes_per_node"], ds["gpu_bytes"], ds["largest_layer_bytes"]) == (cpu, gpu, largest)


def test_vit_giant():
    row = plan("vit-giant", [64])[0]
    assert 1.0e9 < row["params"]["backbone"] < 1.02e9
    assert row["aurora"]["gpu_bytes"] < row["deepspeed_full_training"]["gpu_bytes"]


@pytest.mark.parametrize("backbone, low, high", [("blip2-g-retrieval", 1.15e9, 1.19e9),
                                                 ("blip2-opt-2.7b-vqa", 3.7e9, 3.8e9), ("eva-giant", 1.0e9, 1.02e9)])
def test_large_backbones_and_offload(backbone, low, high):
    """Counted on the meta device in seconds; offload moves the backbone share to the CPU."""
    on_gpu, offloaded = plan(backbone, [8])[0], plan(backbone, [8], offload=True)[0]
    assert low < on_gpu["params"]["backbone"] < high
    assert offloaded["aurora"]["gpu_bytes"] < on_gpu["aurora"]["gpu_bytes"]
    assert offloaded["aurora"]["cpu_bytes_per_node"] > 8 * on_gpu["aurora"]["backbone_gpu_bytes"] * 0.9
    # the factor sets of every width are counted: 1408, 6144 (ViT-g MLP) and, for BLIP-2, 768
    assert on_gpu["params"]["aurora"] > 500_000


def test_cli_table_and_json(capsys):
    assert main(["--backbone", BLIP, "--gpus", "8,16,64"]) == 0
    table = capsys.readouterr().out
    assert "DeepSpeed: all trained" in table and "Activations are not included" in table
    assert [line.split("|")[0].strip() for line in table.splitlines() if line.split("|")[0].strip().isdigit()] == [
        "8", "16", "64"]

    assert main(["--backbone", BLIP, "--gpus", "8,16", "--offload", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == plan(BLIP, [8, 16], offload=True)


@pytest.mark.slow
def test_console_script_json_stdout_is_clean():
    """DeepSpeed logs its accelerator detection to stdout; --json output must still parse."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)
    out = subprocess.run([sys.executable, "-m", "aurora_ds.plan", "--backbone", "vit-tiny", "--gpus", "2",
                          "--json"], capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out)[0]["gpus"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--backbone", "no-such-model", "--gpus", "8"], "registered backbones: ['blip-base-narrow-retrieval', 'blip-base-retrieval'"),
    (["--backbone", BLIP, "--gpus", "0"], "must be positive"),
    (["--backbone", BLIP, "--gpus", "8,abc"], "comma-separated"),
    (["--backbone", BLIP, "--gpus", "8,12", "--nodes", "8"], "12 GPUs cannot be split evenly over 8 nodes"),
    (["--backbone", BLIP, "--gpus", "8", "--nodes", "0"], "nodes must be positive"),
    (["--backbone", BLIP, "--gpus", "8", "--rank", "0"], "rank must be a positive integer"),
    (["--backbone", BLIP, "--gpus", "8", "--precision", "int8"], "invalid choice"),
])
def test_cli_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_plan_errors():
    with pytest.raises(ValueError, match="registered backbones"):
        plan("no-such-model", [8])
    with pytest.raises(ValueError, match="positive"):
        plan(BLIP, [0])
    with pytest.raises(ValueError, match="evenly"):
        plan(BLIP, [6], nodes=4)


# ---- layouts: recommendation, traffic and the communication model ------------------------------

from aurora_ds.plan import LAYOUTS, choose_layout, layout_estimates, count_parameters  # noqa: E402


def test_every_layout_is_estimated_and_replicated_wins_when_it_fits():
    row = plan(BLIP, [16], nodes=2, batch=8)[0]
    assert set(row["layouts"]) == set(LAYOUTS)
    lay = row["layouts"]
    assert row["recommended"] == "replicated" and "fits" in row["reason"]
    # no parameter gathers: only Aurora's gradients travel
    assert lay["replicated"]["inter_node_bytes"] < 1e-3 * lay["zero3"]["inter_node_bytes"]
    assert lay["replicated"]["step_s"] < lay["zero3"]["step_s"]
    assert lay["replicated"]["model_states_bytes"] > lay["zero3"]["model_states_bytes"]
    # hpZ: backward gathers stay on the node; quantized: frozen weights travel as int8
    assert lay["zero3_hpz"]["inter_node_bytes"] < lay["zero3"]["inter_node_bytes"]
    assert lay["zero3_hpz"]["model_states_bytes"] > lay["zero3"]["model_states_bytes"]
    assert lay["zero3_hpz_quant"]["inter_node_bytes"] < 0.51 * lay["zero3_hpz"]["inter_node_bytes"]
    assert lay["zero3_offload"]["host_bytes"] > 0 == lay["zero3"]["host_bytes"]
    for e in lay.values():
        assert e["gpu_bytes"] == e["model_states_bytes"] + e["activation_bytes"]
        assert e["samples_per_s_per_gpu"] == pytest.approx(8 / e["step_s"])


def test_zero3_traffic_by_hand():
    """Every call of a module re-gathers its partitioned parameters: the bytes are the partitioned
    elements times their modules' forward and backward calls; a GPU receives (gpus - per_node)/gpus
    of them from other nodes; each call of a module holding parameters costs the overhead."""
    counts = count_parameters(BLIP, 32, 100_000)
    assert counts["gathered_fwd"] > counts["gathered_bwd"] > counts["backbone"] - counts["backbone_persistent"]
    lay = layout_estimates(counts, 16, 8, "bf16", intra_bw=100.0, inter_bw=10.0, latency=0.0, tflops=1e9,
                           module_overhead=1e-3)["zero3"]
    gathered = 2 * (counts["gathered_fwd"] + counts["gathered_bwd"])
    # after each step DeepSpeed re-gathers every persistent tensor (biases, norms, factors) once
    post_step = 2 * (counts["backbone_persistent"] + counts["aurora_persistent"])
    grads = 2 * 2 * AURORA
    assert lay["inter_node_bytes"] == int((gathered + post_step + grads) * 8 / 16)
    assert lay["intra_node_bytes"] == int((gathered + post_step + grads) * 7 / 16)
    assert lay["comm_s"] == pytest.approx(lay["intra_node_bytes"] / 100e9 + lay["inter_node_bytes"] / 10e9
                                          + 1e-3 * counts["module_calls"], rel=1e-6)
    # one collective per call that gathers (the persistent-only modules gather nothing), plus the
    # two gradient collectives; each pays the latency
    assert 0 < counts["gathering_calls"] < counts["module_calls"]
    assert lay["collectives"] == counts["gathering_calls"] + counts["persistent_tensors"] + 2
    slow = layout_estimates(counts, 16, 8, "bf16", intra_bw=100.0, inter_bw=10.0, latency=1e-4, tflops=1e9,
                            module_overhead=1e-3)["zero3"]
    assert slow["comm_s"] - lay["comm_s"] == pytest.approx(1e-4 * lay["collectives"])


def test_module_calls_follow_the_objective_passes():
    """The tiny BLIP with every tensor partitioned, counted by hand from CALLS: each module that
    holds parameters is called as its tower's passes say; the shared factor sets once per call of
    every adapted layer."""
    from aurora_ds import AuroraConfig, inject_aurora
    from aurora_ds.aurora.layer import AuroraLinear
    from aurora_ds.backbones import build_backbone
    from aurora_ds.plan import CALLS, call_kind

    counts = count_parameters("blip-tiny-retrieval", 4, 0)
    with torch.device("meta"):
        model = build_backbone("blip-tiny-retrieval")
    inject_aurora(model, AuroraConfig(rank=4, backbone="blip-tiny-retrieval"))
    owners = [(n, m) for n, m in model.named_modules() if list(m.parameters(recurse=False))]
    factors = [m for n, m in owners if n.startswith("aurora_factors")]
    adapted = sum(sum(CALLS[call_kind(n, "hf")]) for n, m in model.named_modules() if isinstance(m, AuroraLinear))
    others = sum(sum(CALLS[call_kind(n, "hf")]) for n, m in owners if not n.startswith("aurora_factors"))
    assert len(factors) == 2 and counts["module_calls"] == others + 2 * adapted
    assert {call_kind(n, "hf") for n, _ in owners} == {"image", "text", "cross"}
    # the same model with nothing partitioned gathers nothing, but its hooks still run
    whole = count_parameters("blip-tiny-retrieval", 4, 10**9)
    assert whole["gathered_fwd"] == whole["gathered_bwd"] == whole["gathering_calls"] == 0
    assert whole["module_calls"] == counts["module_calls"] == counts["gathering_calls"]


@pytest.mark.parametrize("option", ["--module-overhead", "--gather-latency", "--module-bytes-cost", "--tflops"])
def test_cli_refuses_a_negative_cost_naming_the_option(option, capsys):
    with pytest.raises(SystemExit):
        main(["--backbone", BLIP, "--gpus", "8", option, "-1"])
    assert f"{option} must be" in capsys.readouterr().err


def test_cli_module_overhead(capsys):
    assert main(["--backbone", BLIP, "--gpus", "8", "--module-overhead", "2000", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["layout_inputs"]["module_overhead_s"] == pytest.approx(2e-3)
    default = plan(BLIP, [8])[0]["layouts"]
    for name, e in row["layouts"].items():
        extra = (2e-3 - 50e-6) * row["params"]["module_calls"] * (name != "replicated")
        assert e["step_s"] == pytest.approx(default[name]["step_s"] + extra)


def test_overhead_term_scales_with_module_calls():
    """ZeRO-3's modelled time grows by the overhead per call times the calls, and only ZeRO-3's."""
    small, large = count_parameters("blip-tiny-retrieval", 4, 0), count_parameters(BLIP, 32, 100_000)
    for counts in (small, large):
        zero = {o: layout_estimates(counts, 8, 8, module_overhead=o) for o in (0.0, 1e-3)}
        for name in LAYOUTS:
            extra = zero[1e-3][name]["comm_s"] - zero[0.0][name]["comm_s"]
            assert extra == pytest.approx(0 if name == "replicated" else 1e-3 * counts["module_calls"])
    assert large["module_calls"] > 4 * small["module_calls"]


def test_small_gpus_take_a_partitioned_layout():
    rows = plan("blip2-g-retrieval", [64], gpus_per_node=8, gpu_memory_gib=4, batch=1, image_size=224)
    r = rows[0]
    assert r["nodes"] == 8 and r["recommended"] != "replicated"
    assert "replicated does not fit" in r["reason"]
    assert r["recommended"].startswith("zero3_hpz")
    cpu = plan("blip2-g-retrieval", [64], gpus_per_node=8, gpu_memory_gib=4, batch=1, image_size=224, cuda=False)[0]
    assert cpu["recommended"] != "zero3_hpz_quant"


def test_recommended_never_slower_than_zero3():
    for backbone in ("blip-base-retrieval", "vit-giant"):
        for gpus in (8, 64, 1024):
            for memory in (8, 24, 80):
                r = plan(backbone, [gpus], gpus_per_node=8, gpu_memory_gib=memory, batch=4)[0]
                if "unavailable" not in r["layouts"]["zero3"]:
                    assert r["layouts"][r["recommended"]]["step_s"] <= r["layouts"]["zero3"]["step_s"] * 1.0001


def test_hpz_needs_several_nodes_of_several_gpus():
    one_node = plan(BLIP, [8], gpu_memory_gib=1.9, batch=1)[0]
    assert "needs 2+ nodes" in one_node["layouts"]["zero3_hpz"]["unavailable"]
    assert one_node["recommended"] in ("zero3", "zero3_offload")


def test_choose_layout_for_a_run(monkeypatch):
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.dsconfig import build_ds_config

    cfg = build_config("", {"data.source": "synthetic", "optim.batch_size": 2, "engine.ds_config": "auto"})
    choice = choose_layout(cfg, 2, 2)
    assert choice["ds_config"] == "replicated" and choice["row"]["backbone"] == "blip-tiny-retrieval"
    assert build_ds_config("auto", cfg, 2)["zero_optimization"]["stage"] == 2
    monkeypatch.setenv("LOCAL_SIZE", "2")
    ds = build_ds_config("zero3_hpz", cfg, 4)
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert build_ds_config("zero3_hpz_quant", cfg, 4)["zero_optimization"]["zero_hpz_partition_size"] == 4


def test_cli_layouts_and_plot(tmp_path, capsys):
    png = tmp_path / "scaling.png"
    assert main(["--backbone", BLIP, "--gpus", "16", "--nodes", "2", "--intra", "pcie", "--inter", "100",
                 "--plot", str(png), "--plot-backbones", "blip-tiny-retrieval"]) == 0
    out = capsys.readouterr().out
    assert "* replicated" in out and "recommended: replicated" in out and "20 GB/s in a node, 100 Gb/s" in out
    assert "ZeRO-3 50 us per module call" in out
    assert png.stat().st_size > 10_000


def test_zero3_regathers_persistent_tensors_after_each_step():
    """DeepSpeed's stage-3 step ends by all-gathering every persistent tensor, frozen or not, one
    collective each: with nothing partitioned, that is all ZeRO-3 moves."""
    whole = count_parameters("blip-tiny-retrieval", 4, 10**9)
    assert whole["gathering_calls"] == 0 and whole["persistent_tensors"] > 50
    lay = layout_estimates(whole, 2, 2, "fp32", intra_bw=1.0, latency=1.0, tflops=1e9, module_overhead=0.0)
    persistent = whole["backbone_persistent"] + whole["aurora_persistent"]
    assert persistent == whole["total"]
    extra_bytes = lay["zero3"]["intra_node_bytes"] - lay["replicated"]["intra_node_bytes"]
    assert extra_bytes == pytest.approx(4 * persistent / 2, abs=1)  # each of 2 ranks receives the other half
    assert lay["zero3"]["collectives"] == whole["persistent_tensors"] + 2


def test_module_bytes_cost_grows_with_the_parameters_called():
    """Each ZeRO-3 call costs module_bytes_cost per GB of its module's parameters, gathered or not."""
    counts = count_parameters("blip-tiny-retrieval", 4, 10**9)
    assert counts["called_numel"] > counts["total"]  # modules are called several times per step
    base, costly = (layout_estimates(counts, 8, 8, precision="fp32", module_bytes_cost=c) for c in (0.0, 2.0))
    for name in LAYOUTS:
        extra = costly[name]["comm_s"] - base[name]["comm_s"]
        assert extra == pytest.approx(0.0 if name == "replicated" else 2.0 * 4 * counts["called_numel"] / 1e9)


def test_loading_peak_per_layout():
    """ZeRO-3 layouts: the rank's share plus the largest module built whole (or one tensor's rows);
    offload keeps the share on the host; replicated maps the files once per node when they are in
    the run's precision and converts a private copy per rank when not; on CPU one memory."""
    from aurora_ds.plan import loading_estimate

    counts = {"backbone": 1000, "largest_layer": 100, "largest_tensor": 80}
    zero3 = loading_estimate(counts, 4, 4, "zero3", 2)
    assert (zero3["loading_gpu_bytes"], zero3["loading_host_bytes"]) == (2 * 1000 / 4 + 2 * 100, 2 * 80 / 4)
    offload = loading_estimate(counts, 4, 4, "zero3_offload", 2)
    assert (offload["loading_gpu_bytes"], offload["loading_host_bytes"]) == (200, 500 + 40)
    same = loading_estimate(counts, 4, 4, "replicated", 2)
    assert same["loading_host_bytes"] == 0
    assert same["loading_mapped_bytes_per_node"] == same["loading_host_bytes_per_node"] == 2000
    converted = loading_estimate(counts, 4, 4, "replicated", 2, checkpoint_nbytes=4)
    assert (converted["loading_host_bytes"], converted["loading_host_bytes_per_node"]) == (2000, 8000)
    cpu = loading_estimate(counts, 4, 4, "zero3", 2, cuda=False)
    assert (cpu["loading_gpu_bytes"], cpu["loading_host_bytes"]) == (0, 700)


def test_host_memory_too_small_for_loading_warns_and_is_not_recommended():
    row = plan("blip-tiny-retrieval", [2], gpus_per_node=2, host_memory_gib=1e-4, checkpoint_precision="fp32")[0]
    assert any(w.startswith("replicated: the 2 ranks of a node need") for w in row["warnings"])
    assert "loading needs" in row["layouts"]["replicated"]["unavailable"] and row["recommended"] != "replicated"
    assert plan("blip-tiny-retrieval", [2], gpus_per_node=2)[0]["warnings"] == []

"""ZeRO-3 hosting of the frozen backbone, measured with real training runs (``launchers/local.sh``,
synthetic batches): backbone parameter bytes held per rank and median step time for 1 rank, 2
ranks, and 2 ranks with parameter offload (``zero3_offload``), as 2-rank/1-rank ratios; plus
``aurora-plan``'s estimates for large backbones on 8/16/64 GPUs, which cannot be measured here.

Each run's peak memory per rank is set next to what one unpartitioned copy of the model needs
and next to ``aurora-plan``'s estimate for the same ranks, precision, offload and persistence
threshold. The scaling entry (docs/scaling.md) is ``--backbone blip2-g-retrieval
--precision bf16 --runs 2,2-offload``: a 1.2 B model on 2 CPU ranks.

The shipped configs keep tensors below 1e5 elements whole on every rank; the tiny backbone has
no larger tensor, so this benchmark sets ``--persistence-threshold`` (default 0) to make the
partitioning visible at any size. The micro-batch is per rank: 2 ranks do twice the samples.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from ..dist import free_port
from ..engine.config import PRECISIONS
from ..engine.rundir import RunDir
from .report import bar_chart, cli_config, fmt, machine, ratio, table, write

# name: (label, ranks, config, nodes). hpZ needs 2+ nodes of 2+ ranks (DeepSpeed turns it off at
# partition size 1, and on one node it is ZeRO-3): "4-hpz" is 2 "nodes" of 2 ranks on 127.0.0.1,
# against "4" (ZeRO-3 over the same 2 x 2). Quantized frozen weights need CUDA kernels.
RUNS = {"1": ("1 rank", 1, "zero3", 1), "2": ("2 ranks", 2, "zero3", 1),
        "2-offload": ("2 ranks, offload", 2, "zero3_offload", 1),
        "2-replicated": ("2 ranks, replicated", 2, "replicated", 1),
        "4": ("2x2 ranks, zero3", 4, "zero3", 2), "4-hpz": ("2x2 ranks, hpZ", 4, "zero3_hpz", 2)}
NOT_MEASURED = {"zero3_hpz_quant": "quantized frozen weights need CUDA (DeepSpeed's quantizer kernels); "
                                   "not measured on a CPU machine"}
MULTINODE_SH = Path(__file__).resolve().parents[2] / "launchers" / "multinode.sh"
BYTES = {name: dtype.itemsize for name, dtype in PRECISIONS.items()}
PLAN = (("blip-large-retrieval", (8, 16, 64)), ("vit-giant", (8, 16, 64)))
LOCAL_SH = Path(__file__).resolve().parents[2] / "launchers" / "local.sh"


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for zero.json, zero.md and zero.png")
    p.add_argument("--backbone", default="blip-tiny-retrieval",
                   help="blip-base-retrieval gives the real figure (minutes per run on CPU)")
    p.add_argument("--rank", type=int, default=0, help="Aurora rank; 0 = 4 for tiny backbones, else 32")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=2, help="micro-batch per rank")
    p.add_argument("--persistence-threshold", type=int, default=0,
                   help="stage3_param_persistence_threshold (the shipped configs use 100000)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per training run")
    p.add_argument("--precision", choices=sorted(BYTES), default="fp32", help="backbone and Aurora precision")
    p.add_argument("--image-size", type=int, default=0, help="input resolution (0 = the backbone's)")
    p.add_argument("--keep-adapters", action="store_true", help="copy each run's adapter_latest into --out")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="with 2-replicated and 2 in --runs: time bare all-gathers on 2 ranks and report the measured "
                        "ZeRO-3 gather time per step (2-rank ZeRO-3 step minus 2-rank replicated step) with "
                        "aurora-plan's counts, the input of aurora-bench gather-fit")
    p.add_argument("--runs", default="1,2,2-offload",
                   help=f"comma-separated runs out of {','.join(RUNS)}; ratios are against the first")


def ds_config_copy(name: str, threshold: int, folder: Path) -> Path:
    """The shipped config ``name`` with the persistence threshold set, written into ``folder``."""
    from aurora_ds.engine.dsconfig import resolve_ds_config

    cfg = json.loads(resolve_ds_config(name).read_text())
    if cfg["zero_optimization"].get("stage") == 3:
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    path = folder / f"{name}_p{threshold}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def launch(processes: int, ds_config: Path, out: Path, args, nodes: int = 1) -> dict:
    """One training run with ``processes`` local ranks (over ``nodes`` launcher "nodes" on
    127.0.0.1); returns its summary.json."""
    import torch

    if not LOCAL_SH.is_file():
        raise SystemExit(f"{LOCAL_SH} not found: run the zero benchmark from a checkout")
    rank = args.rank or (4 if "tiny" in args.backbone else 32)
    train_args = ["--set", "data.source=synthetic", "--set", f"backbone.name={args.backbone}", "--set", f"aurora.rank={rank}",
                  "--set", f"optim.batch_size={args.batch}", "--set", "objective.queue_size=64", "--set", "output.progress=false",
                  "--set", "output.log_every=1", "--set", f"engine.precision={args.precision}",
                  "--set", f"data.image_size={args.image_size}", "--max-steps", str(args.steps), "--out", str(out),
                  "--ds-config", str(ds_config)]
    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    run = RunDir(out)
    out.mkdir(parents=True, exist_ok=True)
    start, load = time.perf_counter(), os.getloadavg()[0]
    with open(run.log, "w") as log:
        if nodes == 1:
            proc = subprocess.run(["bash", str(LOCAL_SH), str(processes), *train_args], stdout=log,
                                  stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
        else:
            env["MASTER_ADDR"] = "127.0.0.1"
            procs = [subprocess.Popen(["bash", str(MULTINODE_SH), "node", str(r), str(nodes), str(processes // nodes),
                                       *train_args], stdout=log, stderr=subprocess.STDOUT, env=env)
                     for r in range(nodes)]
            codes = [p.wait(timeout=args.timeout) for p in procs]
            proc = subprocess.CompletedProcess(procs[0].args, max(codes, key=abs))
    if proc.returncode != 0:
        raise RuntimeError(f"{processes}-rank run failed; log {run.log}:\n{run.log.read_text()[-3000:]}")
    summary = json.loads(run.summary.read_text())
    summary["wall_s"] = time.perf_counter() - start
    summary["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return summary


def measured_row(label: str, processes: int, config: str, summary: dict, args) -> dict:
    times = [h["time_s"] for h in summary["history"][1:]] or [summary["history"][0]["time_s"]]
    step = statistics.median(times)
    return {"run": label, "processes": processes, "ds_config": config,
            "local_parameter_bytes": summary["local_parameter_bytes"],
            "secondary_parameter_bytes": summary.get("secondary_parameter_bytes", 0), "step_s": step,
            "samples_per_s": args.batch * processes / step, "peak_memory_mb": summary["peak_memory_mb"],
            "loss": [h["loss"] for h in summary["history"]],
            "wall_s": summary["wall_s"], "steps": summary["steps"], "load_average": summary.get("load_average"),
            **estimate(processes, config, args)}


def estimate(processes: int, config: str, args) -> dict:
    """What one unpartitioned copy needs, and aurora-plan's model states for this run (MiB per
    rank; on a CPU machine the "GPU" and the offload "CPU" share are the same memory)."""
    from aurora_ds.plan import count_parameters, plan

    rank = args.rank or (4 if "tiny" in args.backbone else 32)
    counts = count_parameters(args.backbone, rank, args.persistence_threshold)
    row = plan(args.backbone, [processes], offload=config == "zero3_offload", precision=args.precision, rank=rank,
               persistence_threshold=args.persistence_threshold)[0]["aurora"]
    if config == "replicated":
        return {"unpartitioned_mb": counts["total"] * BYTES[args.precision] / 2**20,
                "plan_parameter_mb": counts["total"] * BYTES[args.precision] / 2**20,
                "plan_model_states_mb": (counts["total"] * BYTES[args.precision]
                                         + 16 * counts["aurora"] / processes) / 2**20, "params": counts["total"]}
    return {"unpartitioned_mb": counts["total"] * BYTES[args.precision] / 2**20,
            "plan_parameter_mb": (row["backbone_gpu_bytes"] + row["cpu_bytes_per_node"] / processes) / 2**20,
            "plan_model_states_mb": (row["gpu_bytes"] + row["cpu_bytes_per_node"] / processes) / 2**20,
            "params": counts["total"]}


def measure_gathers(out: Path, args) -> dict:
    """aurora_ds.bench.gather on 2 local ranks: all-gather latency and bandwidth here."""
    import sys

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    # the allocator settings the training runs get from launchers/_common.sh: every gather then
    # maps fresh pages, as it does in training
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                    str(free_port()), "-m", "aurora_ds.bench.gather", str(out)], env=env, check=True,
                   timeout=args.timeout, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return json.loads(out.read_text())


def gather_model(zero3: dict, replicated: dict, args) -> dict:
    """The measured ZeRO-3 gather time per step (the 2-rank ZeRO-3 step minus the 2-rank
    replicated step: the same compute, no gathers) beside aurora-plan's counts for this run and
    what the bare all-gathers measured here would take for them (latency per gathering call +
    bytes / bandwidth). The rest is ZeRO-3's own cost per module call; ``aurora-bench gather-fit``
    fits the model's constants to several such reports and checks each against the others."""
    import tempfile

    from aurora_ds.plan import count_parameters, layout_estimates

    with tempfile.TemporaryDirectory() as tmp:
        allgather = measure_gathers(Path(tmp) / "gather.json", args)
    rank = args.rank or (4 if "tiny" in args.backbone else 32)
    counts = count_parameters(args.backbone, rank, args.persistence_threshold)
    est = layout_estimates(counts, 2, 2, args.precision, batch=args.batch, intra_bw=allgather["bandwidth_gbyte_s"],
                           latency=allgather["latency_s"], tflops=1e12, module_overhead=0.0)
    collectives = est["zero3"]["comm_s"] - est["replicated"]["comm_s"]
    measured = zero3["step_s"] - replicated["step_s"]
    return {"backbone": args.backbone, "allgather": allgather, "module_calls_per_step": counts["module_calls"],
            "gathering_calls_per_step": counts["gathering_calls"],
            "gathered_bytes_per_step": est["zero3"]["intra_node_bytes"] - est["replicated"]["intra_node_bytes"],
            "collectives_alone_s": collectives, "measured_gather_s": measured,
            "overhead_per_module_call_s": (measured - collectives) / counts["module_calls"]}


def plan_rows() -> list[dict]:
    """aurora-plan's per-GPU estimates (bf16, no offload), GiB."""
    from aurora_ds.plan import plan

    rows = []
    for backbone, gpus in PLAN:
        for r in plan(backbone, gpus):
            rows.append({"backbone": backbone, "gpus": r["gpus"], "params": r["params"]["total"],
                         "aurora_gpu_gib": r["aurora"]["gpu_bytes"] / 2**30,
                         "aurora_backbone_gpu_gib": r["aurora"]["backbone_gpu_bytes"] / 2**30,
                         "full_training_gpu_gib": r["deepspeed_full_training"]["gpu_bytes"] / 2**30})
    return rows


def markdown(results: dict) -> str:
    one = results["runs"][0]
    first = f"vs {one['run']}"
    rows = [[r["run"], r["ds_config"], f"{r['local_parameter_bytes'] / 2**20:.2f}",
             fmt(ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]), ".2f", "x"),
             f"{r['step_s']:.3f}", fmt(ratio(r["step_s"], one["step_s"]), ".2f", "x"),
             f"{r['samples_per_s']:.2f}",
             " → ".join(f"{x:.1f}" for x in r["load_average"]) if r.get("load_average") else "–"] for r in results["runs"]]
    c = results["config"]
    text = f"Backbone {c['backbone']} ({one['params'] / 1e6:,.1f}M parameters), {c['precision']}, persistence " \
           f"threshold {c['persistence_threshold']}, micro-batch {c['batch']} per rank" \
           f"{', image ' + str(c['image_size']) + ' px' if c['image_size'] else ''}.\n\n"
    text += table(["run", "config", "params MiB/rank", first, "step s (median)", first, "samples/s",
                   "machine load (start → end)"], rows)
    memory = [[r["run"], f"{r['peak_memory_mb']:,.0f}", f"{r['unpartitioned_mb']:,.0f}",
               f"{r['plan_model_states_mb']:,.0f}", f"{r['local_parameter_bytes'] / 2**20:,.0f}",
               f"{r['plan_parameter_mb']:,.0f}", f"{r.get('secondary_parameter_bytes', 0) / 2**20:,.2f}"]
              for r in results["runs"]]
    text += "\nMemory per rank, MiB (peak: the accelerator's, or on CPU the process's peak RSS, which also " \
            "holds the Python runtime, activations and the data):\n\n"
    text += table(["run", "peak", "one unpartitioned copy", "aurora-plan model states", "parameters held",
                   "aurora-plan parameters", "hpZ secondary partition"], memory)
    if results.get("gather_model"):
        g = results["gather_model"]
        text += (f"\nGather time (2-rank ZeRO-3 step - replicated step): measured {g['measured_gather_s']:.3f} s per step; "
                 f"{g['module_calls_per_step']:,} calls of modules holding parameters, {g['gathering_calls_per_step']:,} of "
                 f"them gathering {g['gathered_bytes_per_step'] / 2**20:,.0f} MiB per rank; bare all-gathers here "
                 f"({g['allgather']['latency_s'] * 1e3:.2f} ms + bytes at {g['allgather']['bandwidth_gbyte_s']:.2f} GB/s) "
                 f"would take {g['collectives_alone_s']:.3f} s of it, the rest is "
                 f"{g['overhead_per_module_call_s'] * 1e3:.2f} ms per module call (aurora-bench gather-fit fits the "
                 f"model to several reports).\n")
    for name, why in results.get("not_measured", {}).items():
        text += f"\nNot measured: {name}: {why}\n"
    plan_table = [[p["backbone"], p["gpus"], f"{p['params'] / 1e6:,.0f}M", f"{p['aurora_backbone_gpu_gib']:.2f}",
                   f"{p['aurora_gpu_gib']:.2f}", f"{p['full_training_gpu_gib']:.2f}"] for p in results["plan"]]
    text += "\nEstimates (aurora-plan, bf16, no offload, activations excluded), GiB per GPU:\n\n"
    text += table(["backbone", "GPUs", "params", "Aurora: backbone share", "Aurora: total model states",
                   "full fine-tuning (DeepSpeed estimator)"], plan_table)
    return text


def run(args):
    import tempfile

    os.makedirs(args.out, exist_ok=True)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {list(RUNS)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="aurora-bench-zero-") as tmp:
        for label, processes, config, nodes in (RUNS[r] for r in args.runs.split(",")):
            path = ds_config_copy(config, args.persistence_threshold, Path(tmp))
            summary = launch(processes, path, Path(tmp) / f"{processes}_{config}", args, nodes)
            if args.keep_adapters:
                shutil.copytree(RunDir(Path(tmp) / f"{processes}_{config}").adapter_latest,
                                Path(args.out) / f"adapter_{processes}_{config}", dirs_exist_ok=True)
            rows.append(measured_row(label, processes, config, summary, args))
            print(f"[zero] {label}: {rows[-1]['local_parameter_bytes'] / 2**20:.2f} MiB/rank, "
                  f"{rows[-1]['step_s']:.3f} s/step", flush=True)
    one = rows[0]
    results = {
        "machine": machine(), "config": cli_config(args), "runs": rows,
        "ratios": {r["run"]: {"parameter_bytes": ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]),
                              "step_s": ratio(r["step_s"], one["step_s"]),
                              "samples_per_s": ratio(r["samples_per_s"], one["samples_per_s"]),
                              "peak_memory": ratio(r["peak_memory_mb"], one["peak_memory_mb"])} for r in rows[1:]},
        "not_measured": {**NOT_MEASURED, **({} if any(r["ds_config"] == "zero3_hpz" for r in rows) else {
            "zero3_hpz": "not in --runs (hpZ needs 2 nodes of 2+ ranks: --runs ...,4,4-hpz)"})},
        "plan": plan_rows(),
    }
    by_config = {(r["processes"], r["ds_config"]): r for r in rows}
    if args.calibrate and (2, "zero3") in by_config and (2, "replicated") in by_config:
        results["gather_model"] = gather_model(by_config[2, "zero3"], by_config[2, "replicated"], args)
    path = os.path.join(args.out, "zero.png")
    bar_chart(path, ["backbone params/rank", "step time"],
              {r["run"]: [ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]), ratio(r["step_s"], one["step_s"])]
               for r in rows}, f"relative to {one['run']}", f"ZeRO-3, {args.backbone}")
    results["plots"] = [path]
    for p in write(args.out, "zero", results, markdown(results)):
        print(f"[zero] wrote {p}")
    return 0

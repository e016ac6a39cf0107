"""ZeRO-3 hosting of the frozen backbone, measured with real training runs (``launchers/local.sh``,
synthetic batches): backbone parameter bytes held per rank and median step time for 1 rank, 2
ranks, and 2 ranks with parameter offload (``zero3_offload``), as 2-rank/1-rank ratios; plus
``aurora-plan``'s estimates for large backbones on 8/16/64 GPUs, which cannot be measured here.

The shipped configs keep tensors below 1e5 elements whole on every rank; the tiny backbone has
no larger tensor, so this benchmark sets ``--persistence-threshold`` (default 0) to make the
partitioning visible at any size. The micro-batch is per rank: 2 ranks do twice the samples.
"""

import json
import os
import socket
import statistics
import subprocess
import time
from pathlib import Path

from .report import bar_chart, cli_config, fmt, machine, ratio, table, write

RUNS = (("1 rank", 1, "zero3"), ("2 ranks", 2, "zero3"), ("2 ranks, offload", 2, "zero3_offload"))
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


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ds_config_copy(name: str, threshold: int, folder: Path) -> Path:
    """The shipped config ``name`` with the persistence threshold set, written into ``folder``."""
    from aurora_ds.engine.dsconfig import resolve_ds_config

    cfg = json.loads(resolve_ds_config(name).read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = threshold
    path = folder / f"{name}_p{threshold}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def launch(ranks: int, ds_config: Path, out: Path, args) -> dict:
    """One training run with ``ranks`` local ranks; returns its summary.json."""
    import torch

    if not LOCAL_SH.is_file():
        raise SystemExit(f"{LOCAL_SH} not found: run the zero benchmark from a checkout")
    rank = args.rank or (4 if "tiny" in args.backbone else 32)
    train_args = ["--set", "data=synthetic", "--set", f"backbone={args.backbone}", "--set", f"rank={rank}",
                  "--set", f"batch_size={args.batch}", "--set", "queue_size=64", "--set", "progress=false",
                  "--set", "log_every=1", "--max-steps", str(args.steps), "--out", str(out),
                  "--ds-config", str(ds_config)]
    env = dict(os.environ, MASTER_PORT=str(_port()), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = subprocess.run(["bash", str(LOCAL_SH), str(ranks), *train_args], stdout=log,
                              stderr=subprocess.STDOUT, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed; log {out / 'train.log'}:\n{(out / 'train.log').read_text()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_s"] = time.perf_counter() - start
    return summary


def measured_row(label: str, ranks: int, config: str, summary: dict, batch: int) -> dict:
    times = [h["time_s"] for h in summary["history"][1:]] or [summary["history"][0]["time_s"]]
    step = statistics.median(times)
    return {"run": label, "ranks": ranks, "ds_config": config,
            "local_parameter_bytes": summary["local_parameter_bytes"], "step_s": step,
            "samples_per_s": batch * ranks / step, "peak_memory_mb": summary["peak_memory_mb"],
            "wall_s": summary["wall_s"], "steps": summary["steps"]}


def plan_rows() -> list[dict]:
    """aurora-plan's per-GPU estimates (bf16, no offload), GiB."""
    from aurora_ds.engine.plan import plan

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
    rows = [[r["run"], r["ds_config"], f"{r['local_parameter_bytes'] / 2**20:.2f}",
             fmt(ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]), ".2f", "x"),
             f"{r['step_s']:.3f}", fmt(ratio(r["step_s"], one["step_s"]), ".2f", "x"),
             f"{r['samples_per_s']:.1f}", f"{r['peak_memory_mb']:.0f}"] for r in results["runs"]]
    text = f"Backbone {results['config']['backbone']}, persistence threshold " \
           f"{results['config']['persistence_threshold']}, micro-batch {results['config']['batch']} per rank.\n\n"
    text += table(["run", "config", "backbone params MiB/rank", "vs 1 rank", "step s (median)", "vs 1 rank",
                   "samples/s", "peak memory MB/rank"], rows)
    plan_table = [[p["backbone"], p["gpus"], f"{p['params'] / 1e6:,.0f}M", f"{p['aurora_backbone_gpu_gib']:.2f}",
                   f"{p['aurora_gpu_gib']:.2f}", f"{p['full_training_gpu_gib']:.2f}"] for p in results["plan"]]
    text += "\nEstimates (aurora-plan, bf16, no offload, activations excluded), GiB per GPU:\n\n"
    text += table(["backbone", "GPUs", "params", "Aurora: backbone share", "Aurora: total model states",
                   "full fine-tuning (DeepSpeed estimator)"], plan_table)
    return text


def run(args):
    import tempfile

    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="aurora-bench-zero-") as tmp:
        for label, ranks, config in RUNS:
            path = ds_config_copy(config, args.persistence_threshold, Path(tmp))
            summary = launch(ranks, path, Path(tmp) / f"{ranks}_{config}", args)
            rows.append(measured_row(label, ranks, config, summary, args.batch))
            print(f"[zero] {label}: {rows[-1]['local_parameter_bytes'] / 2**20:.2f} MiB/rank, "
                  f"{rows[-1]['step_s']:.3f} s/step", flush=True)
    one = rows[0]
    results = {
        "machine": machine(), "config": cli_config(args), "runs": rows,
        "ratios": {r["run"]: {"parameter_bytes": ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]),
                              "step_s": ratio(r["step_s"], one["step_s"])} for r in rows[1:]},
        "plan": plan_rows(),
    }
    path = os.path.join(args.out, "zero.png")
    bar_chart(path, ["backbone params/rank", "step time"],
              {r["run"]: [ratio(r["local_parameter_bytes"], one["local_parameter_bytes"]), ratio(r["step_s"], one["step_s"])]
               for r in rows}, "relative to 1 rank", f"ZeRO-3, {args.backbone}")
    results["plots"] = [path]
    for p in write(args.out, "zero", results, markdown(results)):
        print(f"[zero] wrote {p}")
    return 0

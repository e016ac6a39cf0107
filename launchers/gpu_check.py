"""One-shot check that the GPU path works: run by launchers/gpu_check.sh (see its header).

Every recipe trains a few steps on one GPU under DeepSpeed ZeRO-3 with NCCL in bf16 (tiny
backbones: the point is device correctness, not recall), one recipe in fp16, one on the plain
path (and the same with ``engine.compile=on``: CUDA graphs), one at BLIP-base size for throughput, one with ZeRO++ quantized frozen weights
(``zero3_hpz_quant``); ``aurora-eval`` evaluates one adapter; the step
benchmark runs at BLIP-base in bf16, at batch 8 and 64, eager and compiled, with its kernel-op counts. Every run has
``AURORA_STRICT_DEVICES=1``: a tensor that reaches a collective from the wrong device is an error.
Runs go four at a time (one GPU holds them all easily); a failure is recorded and the rest go on.
The summary table is printed and written to OUT/summary.md and OUT/summary.json.

``--cpu`` runs the same plan on the CPU with gloo (fp16, quantized weights and the step benchmark
left out; the quantized run is listed as skipped with the reason), to exercise the script where
no GPU is reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aurora_ds.dist import free_port  # noqa: E402
from aurora_ds.recipes import SMOKE as RECIPES  # noqa: E402

# Sizes that keep the tiny runs quick; everything else stays as the recipe ships it.
SMALL = {"aurora.rank": 4, "optim.batch_size": 8, "eval.batch_size": 16, "data.image_size": 64,
         "data.num_frames": 4, "objective.queue_size": 64, "data.num_workers": 2, "eval.k_test": 16,
         "output.progress": False, "output.log_every": 1}


def sets(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return out


def run(name: str, cmd: list[str], log: Path, env: dict, timeout: int) -> dict:
    t0 = time.time()
    try:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    lines = log.read_text(errors="replace").splitlines()
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return {"name": name, "ok": code == 0, "exit": code, "wall_s": round(time.time() - t0, 1),
            "error": "" if code == 0 else (errors[-1] if errors else (lines[-1] if lines else ""))[:300]}


def train_cmd(args, recipe, backbone, checkpoint, data, out, precision, extra=(), deepspeed=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
           "-m", "aurora_ds.train"] if deepspeed else [sys.executable, "-m", "aurora_ds.train", "--no-deepspeed"]
    cmd += ["--recipe", recipe, "--train-shards", data["train"], "--eval-shards", data["test"], "--out", str(out),
            "--max-steps", str(args.steps)]
    # random-weight checkpoints: a tokenizer is trained on the captions
    return cmd + sets({"backbone.name": backbone, "backbone.checkpoint": checkpoint, "backbone.train_tokenizer": True,
                       "engine.precision": precision, **SMALL, **dict(extra)})


def figures(out: Path) -> dict:
    """Throughput, memory, loss and the headline metric of a finished run."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    hist = summary["history"][1:] or summary["history"]  # the first step includes warm-up
    evals = sorted((out / "eval").glob("step_*.json"))
    metrics = json.loads(evals[-1].read_text()) if evals else {}
    headline = metrics.get("r_mean", metrics.get("accuracy"))
    return {"steps": summary["steps"], "loss_first": summary["history"][0]["loss"], "loss_last": summary["history"][-1]["loss"],
            "step_s": sum(h["time_s"] for h in hist) / len(hist), "peak_memory_mb": summary["peak_memory_mb"],
            "eval": headline}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu_check")
    p.add_argument("--cpu", action="store_true", help="run the plan on the CPU (gloo); no fp16, no step benchmark")
    p.add_argument("--steps", type=int, default=4, help="training steps per run")
    p.add_argument("--parallel", type=int, default=4, help="runs at a time")
    p.add_argument("--timeout", type=int, default=300, help="seconds per run")
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--no-bench", action="store_true", help="leave out the step benchmark")
    args = p.parse_args()

    import torch

    from aurora_ds import build_backbone
    from shard_tools.quickstart import sample_shards

    out = Path(args.out).resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu and not args.cpu:
        sys.exit("gpu_check: no CUDA device visible (use --cpu to exercise the script on the CPU)")
    env = dict(os.environ, AURORA_STRICT_DEVICES="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if not gpu:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    info = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None}
    try:
        import deepspeed
        import transformers

        info.update(deepspeed=deepspeed.__version__, transformers=transformers.__version__)
    except ImportError as e:
        sys.exit(f"gpu_check: {e} (carry deepspeed, webdataset, braceexpand, decord as wheels: see gpu_check.sh)")
    print(f"[gpu_check] {json.dumps(info)}", flush=True)

    t0 = time.time()
    datasets = {d for d, _ in RECIPES.values()}
    data = {d: sample_shards(d, 32 if d == "coco" else 16, work / "raw" / d, str(work / "shards" / d), seed=1, maxcount=4)
            for d in sorted(datasets)}
    checkpoints = {}
    for backbone in sorted({b for _, b in RECIPES.values()} | {"blip-base-retrieval"}):
        torch.manual_seed(0)
        checkpoints[backbone] = work / "ckpt" / backbone
        if not (checkpoints[backbone] / "config.json").exists():
            build_backbone(backbone).save_pretrained(checkpoints[backbone])
    print(f"[gpu_check] data and checkpoints ready in {time.time() - t0:.0f} s", flush=True)

    main_precision = "bf16"
    jobs = {}
    for recipe, (dataset, backbone) in RECIPES.items():
        jobs[f"{recipe}/zero3/{main_precision}"] = train_cmd(args, recipe, backbone, checkpoints[backbone], data[dataset],
                                                            work / "runs" / recipe, main_precision)
    if gpu:
        jobs["coco_retrieval/zero3/fp16"] = train_cmd(args, "coco_retrieval", "blip-tiny-retrieval",
                                                      checkpoints["blip-tiny-retrieval"], data["coco"],
                                                      work / "runs" / "coco_fp16", "fp16")
    jobs[f"coco_retrieval/plain/{main_precision}"] = train_cmd(
        args, "coco_retrieval", "blip-tiny-retrieval", checkpoints["blip-tiny-retrieval"], data["coco"],
        work / "runs" / "coco_plain", main_precision, deepspeed=False)
    if gpu:  # the captured step: torch.compile in full-graph mode with CUDA graphs
        jobs[f"coco_retrieval/plain/{main_precision}/compiled"] = train_cmd(
            args, "coco_retrieval", "blip-tiny-retrieval", checkpoints["blip-tiny-retrieval"], data["coco"],
            work / "runs" / "coco_plain_compiled", main_precision, extra={"engine.compile": "on"}, deepspeed=False)
    base_size = {"aurora.rank": 32, "optim.batch_size": 16 if gpu else 2, "data.image_size": 224 if gpu else 64,
                 "objective.queue_size": 1024, "eval.k_test": 16}
    jobs[f"coco_retrieval/zero3/{main_precision}/blip-base"] = train_cmd(
        args, "coco_retrieval", "blip-base-retrieval", checkpoints["blip-base-retrieval"], data["coco"],
        work / "runs" / "coco_base", main_precision, extra=base_size)
    # ZeRO++ with the frozen weights held and gathered as int8 (DeepSpeed's CUDA quantizer kernels):
    # on one GPU hpZ itself is off (partition size 1), the quantized weights are not.
    quant = f"coco_retrieval/zero3_hpz_quant/{main_precision}"
    skipped = {}
    if gpu:
        jobs[quant] = train_cmd(args, "coco_retrieval", "blip-tiny-retrieval", checkpoints["blip-tiny-retrieval"],
                                data["coco"], work / "runs" / "coco_quant", main_precision) + ["--ds-config", "zero3_hpz_quant"]
    else:
        skipped[quant] = "quantized frozen weights need CUDA (DeepSpeed's quantizer kernels)"
    if args.only:
        jobs = {k: v for k, v in jobs.items() if k in args.only.split(",")}
        skipped = {k: v for k, v in skipped.items() if k in args.only.split(",")}
    outs = {name: Path(cmd[cmd.index("--out") + 1]) for name, cmd in jobs.items()}

    def one(item):
        name, cmd = item
        log = out / (name.replace("/", "_") + ".log")
        result = run(name, cmd, log, env, args.timeout)
        print(f"[gpu_check] {'ok  ' if result['ok'] else 'FAIL'} {name} ({result['wall_s']} s) {result['error']}", flush=True)
        return {**result, **figures(outs[name])}

    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(one, jobs.items()))
    for name, why in skipped.items():
        print(f"[gpu_check] skip {name}: {why}", flush=True)
        results.append({"name": name, "ok": True, "skipped": why, "exit": None, "wall_s": 0.0, "error": ""})

    # aurora-eval from the adapter alone, on the first recipe's run.
    first = outs.get(f"coco_retrieval/zero3/{main_precision}")
    if first is not None and (first / "adapter_latest").exists():
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
               "-m", "aurora_ds.evaluate", "--adapter", str(first / "adapter_latest"), "--shards", data["coco"]["test"],
               "--out", str(work / "eval_coco")]  # everything else from the adapter itself
        result = run("aurora-eval coco_retrieval", cmd, out / "aurora_eval.log", env, args.timeout)
        print(f"[gpu_check] {'ok  ' if result['ok'] else 'FAIL'} aurora-eval ({result['wall_s']} s) {result['error']}", flush=True)
        results.append(result)

    benches = []
    bench_batches = (8, 64) if gpu and not args.only and not args.no_bench else ()
    for batch in bench_batches:
        step_out = out / f"step_b{batch}"
        cmd = [sys.executable, "-m", "aurora_ds.bench.cli", "step", "--out", str(step_out), "--sizes", "base",
               "--methods", "floor,aurora,aurora-nodrop,lora,lora-nodrop,full,floor+compiled,aurora+compiled",
               "--precision", "bf16",
               "--device", "cuda", "--batch", str(batch), "--image-size", "224", "--steps", "10", "--warmup", "3",
               "--no-isolate"]
        name = f"step benchmark (BLIP-base, bf16, batch {batch}, 224 px)"
        result = run(name, cmd, out / f"step_bench_b{batch}.log", env, args.timeout)
        print(f"[gpu_check] {'ok  ' if result['ok'] else 'FAIL'} {name} ({result['wall_s']} s) {result['error']}", flush=True)
        results.append(result)
        if (step_out / "step.md").exists():
            benches.append(f"Step benchmark, batch {batch} (kernel ops: forward + backward; AdamW apart):\n\n"
                           + (step_out / "step.md").read_text())

    rows = ["| run | result | wall s | step s | peak MiB | loss first → last | eval |", "|---|---|---|---|---|---|---|"]
    for r in results:
        fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "–"  # noqa: E731
        loss = f"{fmt(r.get('loss_first'), '.3f')} → {fmt(r.get('loss_last'), '.3f')}" if "loss_first" in r else "–"
        result = f"skipped: {r['skipped']}" if r.get("skipped") else "ok" if r["ok"] else "FAIL: " + r["error"].replace("|", "/")
        rows.append(f"| {r['name']} | {result} | {r['wall_s']} | "
                    f"{fmt(r.get('step_s'), '.3f')} | {fmt(r.get('peak_memory_mb'), '.0f')} | {loss} | {fmt(r.get('eval'), '.1f')} |")
    header = f"GPU check {info['date']} on {info['device']} (torch {info['torch']}, CUDA {info['cuda']}, NCCL {info['nccl']}, " \
             f"deepspeed {info['deepspeed']}, transformers {info['transformers']}), {time.time() - t0:.0f} s"
    text = "\n".join([header, "", *rows, "", *benches])
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    print("\n" + text, flush=True)
    failed = [r["name"] for r in results if not r["ok"]]
    if failed:
        sys.exit(f"gpu_check: {len(failed)} failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

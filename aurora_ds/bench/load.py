"""Loading a checkpoint of a backbone on N local ranks, per layout: how long it takes, what each
rank reads of the files, and each rank's peak host memory while it loads, against
``aurora-plan``'s loading figure.

Memory is the peak of ``RssAnon`` (what a rank holds itself) sampled every 10 ms, above the
rank's own runtime before the build, and the checkpoint pages still mapped at the end
(``RssFile``: shared by the node's ranks; a replicated model loaded by ``from_pretrained`` in
the checkpoint's precision is those pages). ``--write`` first writes a random-weight checkpoint
of the backbone in the hub layout (``bench/checkpoint.py``) when the folder has none.

    aurora-bench load --backbone blip2-opt-2.7b-vqa --checkpoint /data/blip2-opt --write \\
        --layouts zero3,zero3_offload,replicated --out bench_load
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..dist import free_port, shutdown, world
from ..engine.config import PRECISIONS
from .report import machine, table, write

LAYOUTS = ("zero3", "zero3_offload", "replicated")


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for load.json and load.md")
    p.add_argument("--backbone", default="blip2-opt-tiny-vqa")
    p.add_argument("--checkpoint", required=True, help="a save_pretrained directory of the backbone")
    p.add_argument("--write", action="store_true",
                   help="write a random-weight checkpoint there first if it holds no config.json")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated: {', '.join(LAYOUTS)}")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="shard file size for --write")
    p.add_argument("--timeout", type=int, default=1200, help="seconds per layout")


def rank_main(backbone: str, checkpoint: str, precision: str, layout: str, out: str) -> None:
    """One rank: build and load the backbone as ``aurora-train`` does for ``layout``, measure."""
    import deepspeed

    import transformers

    from ..backbones import build_backbone, get_spec
    from ..engine.backend import local_parameter_bytes
    from ..engine.config import build_config
    from ..engine.dsconfig import build_ds_config, zero_stage
    from ..engine.logging import HostMemory, resident_mb
    from ..engine.setup import release_shm_buffer

    deepspeed.init_distributed()
    release_shm_buffer()
    # the model class imported before the baseline: the runtime, not the loading
    getattr(transformers, get_spec(backbone).extra.get("model_class", "PreTrainedModel"))
    rank, size = world()
    cfg = build_config(overrides={"backbone.name": backbone, "engine.precision": precision,
                                  "optim.batch_size": 1, "data.source": "synthetic"})
    ds = build_ds_config(layout, cfg, size)
    baseline, mapped_before = resident_mb(), resident_mb("RssFile")
    memory, began = HostMemory("loading"), time.perf_counter()
    keep = None
    if zero_stage(ds) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds)
    model = build_backbone(backbone, checkpoint, PRECISIONS[precision])
    seconds = time.perf_counter() - began
    for p in model.parameters():  # read every value once, as the first step does: mapped pages come in lazily
        (p.ds_tensor if hasattr(p, "ds_id") else p.data).view(-1).max()
    peak, mapped = memory.stop()["loading"], resident_mb("RssFile") - mapped_before
    held = local_parameter_bytes(model)
    report = getattr(model, "load_report", None)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "seconds": seconds, "baseline_mb": baseline, "peak_mb": peak, "loading_mb": peak - baseline,
        "mapped_mb": mapped,
        "held_mb": held / 2**20, "read_mb": report.read_bytes / 2**20 if report else None,
        "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
    del keep
    shutdown()


def measure(layout: str, args, folder: Path) -> dict:
    """Run ``layout`` on ``args.ranks`` local ranks; the per-rank records and the planner's."""
    import torch

    from ..plan import count_parameters, loading_estimate

    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               MALLOC_TRIM_THRESHOLD_="0", MALLOC_MMAP_THRESHOLD_="65536")  # as launchers/ set them
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.ranks), "--master_port",
           str(free_port()), "-m", "aurora_ds.bench.load", args.backbone, str(args.checkpoint), args.precision,
           layout, str(folder)]
    began = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
    if code != 0:
        raise RuntimeError(f"loading with {layout} failed; log {folder / 'log.txt'}:\n"
                           f"{(folder / 'log.txt').read_text()[-3000:]}")
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    counts = count_parameters(args.backbone)
    plan = loading_estimate(counts, args.ranks, args.ranks, layout, PRECISIONS[args.precision].itemsize,
                            cuda=torch.cuda.is_available())
    planned = (plan["loading_gpu_bytes"] + plan["loading_host_bytes"]) / 2**20  # one memory on a CPU host
    mapped = plan["loading_mapped_bytes_per_node"] / 2**20
    return {"layout": layout, "ranks": ranks, "wall_s": time.perf_counter() - began, "plan_loading_mb": planned,
            "plan_mapped_mb": mapped, "model_mb": counts["backbone"] * PRECISIONS[args.precision].itemsize / 2**20,
            "worst_vs_plan": max(r["loading_mb"] + r["mapped_mb"] for r in ranks) / (planned + mapped)}


def markdown(results: dict) -> str:
    rows = []
    for run in results["runs"]:
        for r in run["ranks"]:
            rows.append([run["layout"], r["rank"], f"{r['seconds']:.1f}", f"{r['read_mb']:,.0f}" if r["read_mb"] else "–",
                         f"{r['held_mb']:,.0f}", f"{r['loading_mb']:,.0f}", f"{run['plan_loading_mb']:,.0f}",
                         f"{r['mapped_mb']:,.0f}", f"{run['plan_mapped_mb']:,.0f}",
                         f"{(r['loading_mb'] + r['mapped_mb']) / (run['plan_loading_mb'] + run['plan_mapped_mb']):.2f}",
                         f"{run['model_mb']:,.0f}"])
    head = ["layout", "rank", "load s", "read MiB", "held MiB", "private peak MiB", "aurora-plan", "mapped MiB",
            "aurora-plan", "(private + mapped) / plan", "whole model MiB"]
    return "\n".join([f"# Loading {results['backbone']} ({results['precision']}) on {results['ranks_per_run']} ranks",
                      "", f"Checkpoint: {results['checkpoint']} ({results['files']} files, "
                      f"largest {results['largest_file_mb']:,.0f} MiB). Machine: {json.dumps(results['machine'])}", "", table(head, rows)])


def run(args):
    from ..backbones.loading import weight_files
    from .checkpoint import write_random_checkpoint

    checkpoint = Path(args.checkpoint)
    if args.write and not (checkpoint / "config.json").is_file():
        began = time.perf_counter()
        write_random_checkpoint(args.backbone, checkpoint, PRECISIONS[args.precision], int(args.max_shard_gb * 2**30))
        print(f"wrote {checkpoint} in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    files = weight_files(checkpoint)
    out = Path(args.out)
    results = {"backbone": args.backbone, "precision": args.precision, "ranks_per_run": args.ranks,
               "checkpoint": str(checkpoint), "files": len(files),
               "largest_file_mb": max(f.stat().st_size for f in files) / 2**20, "machine": machine(), "runs": []}
    for layout in args.layouts.split(","):
        results["runs"].append(measure(layout, args, out / layout))
        print(f"{layout}: peak above runtime / aurora-plan = {results['runs'][-1]['worst_vs_plan']:.2f}", file=sys.stderr)
    write(out, "load", results, markdown(results))
    return 0


if __name__ == "__main__":
    rank_main(*sys.argv[1:])

"""Training-step cost of Aurora against what it competes with, on the same backbone and batch:

* floor: the frozen backbone, forward + backward to the inputs (pixels and text embeddings), no
  optimizer; what any method that backpropagates through the backbone pays;
* aurora: the paper's targets (R=4 tiny, R=32 base) with its defaults (GQT, ICE), AdamW step;
* lora: peft LoRA on exactly the Aurora-adapted linears, rank chosen so its trainable count is
  closest to Aurora's (rank r on an out x in linear costs r * (in + out)), AdamW step;
* full: every parameter trained, AdamW step.

Loss = sum of squared features of ``forward_features``. Each configuration runs in its own fresh
process, so peak memory is its own: on CPU the growth of peak RSS (ru_maxrss) over the RSS right
after building the model and batch; on a GPU ``max_memory_allocated`` over what was allocated
then. Figures are reported as ratios measured side by side in one run.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from .report import bar_chart, cli_config, fmt, machine, ratio, table, write

METHODS = ("floor", "aurora", "lora", "full")
SIZES = {"tiny": ("blip-tiny-retrieval", 4), "base": ("blip-base-retrieval", 32)}


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for step.json, step.md and step_*.png")
    p.add_argument("--sizes", default="tiny,base", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--image-size", type=int, default=0, help="cap on the image size; 0 = the backbone's (384 for base: slow on CPU)")
    p.add_argument("--seq-len", type=int, default=12)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="all configurations in this process: faster, but no CPU memory figures (peak RSS "
                        "never goes down, so only the first would be right); GPU figures stay valid")


def aurora_targets(backbone: str, rank: int):
    """(names of the Aurora-adapted linears, sum of in + out over them, Aurora's trainable count),
    from a build on the meta device (allocates nothing)."""
    import torch

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora

    with torch.device("meta"):
        handle = inject_aurora(build_backbone(backbone), AuroraConfig(rank=rank, backbone=backbone))
    width = sum(layer.in_features + layer.out_features for layer in handle.layers.values())
    return list(handle.layers), width, handle.num_trainable()


def matched_lora_rank(target_count: int, width: int) -> int:
    """The LoRA rank whose count r * width is closest to ``target_count`` (at least 1)."""
    low = max(1, target_count // width)
    return min((low, low + 1), key=lambda r: abs(r * width - target_count))


def inject_lora(model, names: list[str], rank: int, dropout: float = 0.1):
    """peft LoRA on exactly ``names``; only the LoRA matrices stay trainable."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("the LoRA baseline needs peft, an optional extra: pip install 'aurora_ds[bench]' "
                          f"(or pip install peft) [{e}]") from None

    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=names), model)


def _embeddings_need_grad(module, inputs, output):
    # A non-leaf that requires grad: BLIP adds position embeddings in place afterwards.
    return output.detach().requires_grad_(True) * 1.0


def prepare(method: str, backbone: str, rank: int, dtype, device):
    """The backbone set up for ``method``; returns (model, extra info for the report)."""
    import torch

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora

    torch.manual_seed(0)
    model = build_backbone(backbone, dtype=dtype).to(device)
    info = {}
    if method == "floor":
        model.requires_grad_(False)
        if hasattr(model, "text_encoder"):
            model.text_encoder.embeddings.word_embeddings.register_forward_hook(_embeddings_need_grad)
    elif method == "aurora":
        inject_aurora(model, AuroraConfig(rank=rank, backbone=backbone))
    elif method == "lora":
        names, width, aurora_count = aurora_targets(backbone, rank)
        info["lora_rank"] = matched_lora_rank(aurora_count, width)
        inject_lora(model, names, info["lora_rank"])
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
    model.train()
    return model, info


def measure(job: dict) -> dict:
    """One configuration in this (fresh) process: step times and peak memory growth."""
    import dataclasses

    import torch

    from aurora_ds.backbones import example_batch, forward_features, get_spec

    from aurora_ds.engine.config import PRECISIONS

    from .report import current_rss_mb, peak_rss_mb

    device = torch.device(job["device"])
    dtype = PRECISIONS[job["precision"]]
    spec = get_spec(job["backbone"])
    if job["image_size"]:  # a cap: smaller images use the first position embeddings; larger would not fit
        spec = dataclasses.replace(spec, image_size=min(job["image_size"], spec.image_size))
    model, info = prepare(job["method"], job["backbone"], job["rank"], dtype, device)
    batch = {k: v.to(device) for k, v in example_batch(spec, job["batch"], job["seq_len"]).items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5) if params else None
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def step():
        pixels = batch["pixel_values"].detach().requires_grad_(job["method"] == "floor")
        feats = forward_features(model, spec, {**batch, "pixel_values": pixels})
        sum(f.float().pow(2).sum() for f in feats.values()).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    rss_after_build, peak_after_build = current_rss_mb(), peak_rss_mb()
    for _ in range(job["warmup"]):
        step()
    times = []
    for _ in range(job["steps"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = peak_rss_mb() - rss_after_build if job["isolated"] else None
    median = statistics.median(times)
    return {
        **{k: job[k] for k in ("size", "backbone", "method")},
        "trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in model.parameters()),
        "step_s": median, "step_times_s": times, "samples_per_s": job["batch"] / median,
        "peak_memory_mb": peak, "memory_measure": "cuda max_memory_allocated - after build" if cuda
        else "ru_maxrss - RSS after build", "rss_after_build_mb": rss_after_build,
        "peak_rss_after_build_mb": peak_after_build, **info,
    }


def run_isolated(job: dict) -> dict:
    """``measure(job)`` in a fresh interpreter; its result is the last line it prints."""
    env = dict(os.environ)
    # Return freed buffers to the OS, so RSS after build is what the model really holds.
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    proc = subprocess.run([sys.executable, "-m", "aurora_ds.bench.step", json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"step benchmark {job['size']}/{job['method']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarise(rows: list[dict]) -> dict:
    """Aurora's time and memory over each competitor's, per size."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        by = {r["method"]: r for r in rows if r["size"] == size}
        out[size] = {key: {f"aurora/{m}": ratio(by["aurora"][key], by[m][key]) for m in METHODS if m != "aurora"}
                     for key in ("step_s", "peak_memory_mb")}
        out[size]["trainable"] = {m: by[m]["trainable"] for m in METHODS}
    return out


def markdown(results: dict) -> str:
    rows = [[r["size"], r["method"] + (f" (r={r['lora_rank']})" if "lora_rank" in r else ""),
             f"{r['trainable']:,}", f"{r['step_s']:.3f}", f"{r['samples_per_s']:.2f}", fmt(r["peak_memory_mb"], ".0f")]
            for r in results["runs"]]
    text = table(["size", "method", "trainable", "step s (median)", "samples/s", "peak memory MB"], rows)
    ratio_rows = [[size, key, *(fmt(v, ".2f", "x") for v in r[key].values())]
                  for size, r in results["ratios"].items() for key in ("step_s", "peak_memory_mb")]
    text += "\n" + table(["size", "measure", "Aurora/floor", "Aurora/LoRA", "Aurora/full"], ratio_rows)
    m = results["machine"]
    return text + f"\nMachine: {m['cpus_usable']} usable CPUs, torch {m['torch']}, device {m['device']}, " \
                  f"{results['config']['precision']}.\n"


def plot(results: dict, out: str) -> list[str]:
    """Time and memory of each method relative to the floor, one bar group per size."""
    sizes = list(results["ratios"])
    by = {(r["size"], r["method"]): r for r in results["runs"]}
    paths = []
    for key, label in (("step_s", "step time"), ("peak_memory_mb", "peak memory")):
        series = {m: [ratio(by[s, m][key], by[s, "floor"][key]) for s in sizes] for m in METHODS}
        path = os.path.join(out, f"step_{'time' if key == 'step_s' else 'memory'}.png")
        bar_chart(path, sizes, series, f"{label} / floor", f"{label} relative to the frozen-backbone floor")
        paths.append(path)
    return paths


def run(args):
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; known: {sorted(SIZES)}")
    rows = []
    for size in sizes:
        backbone, rank = SIZES[size]
        for method in METHODS:
            job = {"size": size, "backbone": backbone, "rank": rank, "method": method, "device": device,
                   "precision": args.precision, "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
                   "image_size": args.image_size, "seq_len": args.seq_len, "isolated": args.isolate}
            rows.append(run_isolated(job) if args.isolate else measure(job))
            print(f"[step] {size} {method}: {rows[-1]['step_s']:.3f} s/step, "
                  f"{fmt(rows[-1]['peak_memory_mb'], '.0f', ' MB')}, {rows[-1]['trainable']:,} trainable", flush=True)
    results = {"machine": machine(), "config": {**cli_config(args), "device": device}, "runs": rows,
               "ratios": summarise(rows)}
    os.makedirs(args.out, exist_ok=True)
    results["plots"] = plot(results, args.out)
    for path in write(args.out, "step", results, markdown(results)):
        print(f"[step] wrote {path}")
    return 0


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))

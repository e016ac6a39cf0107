"""Training-step cost of Aurora against what it competes with, on the same backbone and batch:

* floor: the frozen backbone, forward + backward to the inputs (pixels and text embeddings), no
  optimizer; what any method that backpropagates through the backbone pays;
* floor-nopix: the same without the patch convolution's gradient to the pixels (what an
  adapter needs: nothing below the first adapted layer);
* aurora: the paper's targets (R=4 tiny, R=32 base) with its defaults (GQT, ICE), AdamW step;
* aurora-nodrop: the same with rank-path dropout 0 (aurora: 0.1; ``merged: auto``), and with
  ``merged: on`` (aurora-merged: every adapted layer through one merged weight) or ``off``
  (aurora-unmerged);
* aurora-plain: the same adapted linears without GQT and ICE;
* lora / lora-nodrop: peft LoRA on exactly the Aurora-adapted linears, rank chosen so its
  trainable count is closest to Aurora's (rank r on an out x in linear costs r * (in + out)),
  with the usual lora_dropout=0.1 (peft drops out the full-width input) and with 0;
* vera: peft VeRA on the same linears (rank 256, its paper's default);
* full: every parameter trained, AdamW step.

Loss = sum of squared features of ``forward_features``. Time: every configuration is built once
in one process and timed interleaved round by round (A B C, C B A, ...) on the same inputs with
the thread count pinned, so a neighbour's load hits all of them alike; the report gives the
median of per-round ratios and their spread, for CPU time (time.process_time) beside wall
time: on shared cores a neighbour's load moves wall time far more than CPU time. Memory: on CPU
each configuration runs again in its own fresh process (peak RSS only grows, so one process
cannot measure several): the peak RSS of its steps (VmHWM, reset after the build, whose
transients are larger than a step's) over the RSS right after building the model and batch; on a GPU ``max_memory_allocated`` over what was allocated before that configuration's
step, in the timing process itself.

Kernel ops (``bench/kernels.py``): at BLIP sizes a GPU step is bound by kernel launches, not
arithmetic, so each configuration also reports the kernel-launching ATen ops of one forward +
backward, counted from gradients set to None (no ``.grad`` accumulation), and their multiple of
the floor's; the optimizer separately, as one fused AdamW step (what the engine runs);
and the ops per adapted-layer call, (ops - floor ops) / calls, the calls counted by forward
hooks on the adapted modules. The counts do not depend on image size or batch (from batch 2 on),
so a CPU run at 32 px counts what a GPU run at 224 px launches.

Host time at negligible compute: size ``narrow`` is BLIP-base's structure (12 + 12 layers, the
same adapted linears) at width 32, so arithmetic vanishes; its CPU-time ratios against the floor,
timed interleaved, are what each method adds per step on the host.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from .report import bar_chart, cli_config, fmt, machine, ratio, table, write

METHODS = ("floor", "floor-nopix", "aurora", "aurora-nodrop", "aurora-merged", "aurora-unmerged", "aurora-plain", "lora",
           "lora-nodrop", "vera", "full")
COMPILED = "+compiled"  # a method's suffix: its step under torch.compile (full graph; CUDA graphs on a GPU)
SIZES = {"tiny": ("blip-tiny-retrieval", 4), "base": ("blip-base-retrieval", 32),
         "narrow": ("blip-base-narrow-retrieval", 32)}
VERA_RANK = 256


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for step.json, step.md and step_*.png")
    p.add_argument("--sizes", default="tiny,base", help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {list(METHODS)}; any with '{COMPILED}' for its compiled step")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed rounds (every configuration once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the timed process (CPU)")
    p.add_argument("--image-size", type=int, default=0, help="cap on the image size; 0 = the backbone's (384 for base: slow on CPU)")
    p.add_argument("--seq-len", type=int, default=12)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="no fresh processes: faster, but no CPU memory figures (peak RSS never goes down); "
                        "GPU memory figures stay valid")


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


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("the LoRA and VeRA baselines need peft, an optional extra: pip install 'aurora_ds[bench]' "
                          f"(or pip install peft) [{e}]") from None
    return peft


def inject_lora(model, names: list[str], rank: int, dropout: float = 0.1):
    """peft LoRA on exactly ``names``; only the LoRA matrices stay trainable."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=names)
    return peft.inject_adapter_in_model(config, model)


def inject_vera(model, names: list[str], rank: int = VERA_RANK):
    """peft VeRA on exactly ``names`` (shared frozen random A, B; trained scaling vectors). Returns
    peft's wrapper, which owns the shared A and B (it hands attribute look-ups to the model)."""
    peft = _peft()
    return peft.get_peft_model(model, peft.VeraConfig(r=rank, target_modules=names))


def inject_vblora(model, names: list[str], rank: int, vector_length: int, num_vectors: int):
    """peft VB-LoRA on exactly ``names``: one trained bank of ``num_vectors`` vectors shared by
    every layer, and per layer trained logits choosing each sub-vector of its rank-r factors."""
    peft = _peft()
    config = peft.VBLoRAConfig(r=rank, vector_length=vector_length, num_vectors=num_vectors, target_modules=names)
    return peft.get_peft_model(model, config)


def _embeddings_need_grad(module, inputs, output):
    # A non-leaf that requires grad: BLIP adds position embeddings in place afterwards.
    return output.detach().requires_grad_(True) * 1.0


class _ThroughOne:
    """The same for a compiled step (which cannot make a tensor require grad mid-graph): the
    output times a trainable 1, three small ops more than the eager floor's."""

    def __init__(self, module):
        import torch

        self.one = torch.ones((), device=module.weight.device, requires_grad=True)

    def __call__(self, module, inputs, output):
        return output * self.one


def prepare(method: str, backbone: str, rank: int, dtype, device, compiled: bool = False):
    """The backbone set up for ``method``; returns (model, extra info for the report, the adapted
    modules: the AuroraLinear layers or peft's tuner layers)."""
    import torch

    from aurora_ds import AuroraConfig, build_backbone, inject_aurora

    torch.manual_seed(0)
    model = build_backbone(backbone, dtype=dtype).to(device)
    info, adapted = {}, []
    if method in ("floor", "floor-nopix"):
        model.requires_grad_(False)
        need_grad = _ThroughOne if compiled else (lambda module: _embeddings_need_grad)
        if hasattr(model, "text_encoder"):
            embeddings = model.text_encoder.embeddings.word_embeddings
            embeddings.register_forward_hook(need_grad(embeddings))
        if method == "floor-nopix" and hasattr(model, "vision_model"):
            # Backward through the whole vision tower still, but not the patch convolution's to the pixels.
            patches = model.vision_model.embeddings.patch_embedding
            patches.register_forward_hook(need_grad(patches))
    elif method in ("aurora", "aurora-nodrop", "aurora-merged", "aurora-unmerged", "aurora-plain"):
        options = {"aurora-nodrop": {"dropout": 0.0}, "aurora-merged": {"dropout": 0.0, "merged": "on"},
                   "aurora-unmerged": {"dropout": 0.0, "merged": "off"},
                   "aurora-plain": {"gated_query": False, "context_enhancement": False}}.get(method, {})
        adapted = list(inject_aurora(model, AuroraConfig(rank=rank, backbone=backbone, **options)).layers.values())
    elif method in ("lora", "lora-nodrop"):
        names, width, aurora_count = aurora_targets(backbone, rank)
        info["lora_rank"] = matched_lora_rank(aurora_count, width)
        inject_lora(model, names, info["lora_rank"], 0.1 if method == "lora" else 0.0)
    elif method == "vera":
        names, _, _ = aurora_targets(backbone, rank)
        model = inject_vera(model, names)
        info["vera_rank"] = VERA_RANK
    elif method != "full":
        raise ValueError(f"unknown method {method!r}; methods: {METHODS}")
    if method in ("lora", "lora-nodrop", "vera"):
        adapted = [m for m in model.modules() if isinstance(m, _peft().tuners.tuners_utils.BaseTunerLayer)]
    model.train()
    return model, info, adapted


class Config:
    """One configuration, built and ready to step on the shared batch."""

    def __init__(self, job: dict, method: str, batch: dict, spec):
        import torch

        from aurora_ds.engine.config import PRECISIONS

        self.method, self.spec, self.batch = method, spec, batch
        self.base = method.removesuffix(COMPILED)
        self.model, self.info, self.adapted = prepare(self.base, job["backbone"], job["rank"], PRECISIONS[job["precision"]],
                                                      torch.device(job["device"]), method.endswith(COMPILED))
        self.loss = self._loss
        self.compiled = method.endswith(COMPILED)
        self.generated_kernels = None  # a compiled step's kernels, counted when they are generated
        if self.compiled:
            import torch._functorch.config
            import torch._inductor.config

            # Generated afresh (a cached graph is not generated, so its kernels would go uncounted).
            torch._inductor.config.fx_graph_cache = False
            torch._functorch.config.enable_autograd_cache = False
            from aurora_ds.aurora import as_one_call

            self.loss = torch.compile(as_one_call(self._loss, self.model), fullgraph=True,
                                      mode="reduce-overhead" if job["device"] == "cuda" else None)
            from aurora_ds.engine.backend import EAGER_CALLS

            with torch.no_grad():  # eager calls first, as engine.compile makes (the adapted layers learn their readers)
                for _ in range(EAGER_CALLS):
                    self._loss(batch["pixel_values"])
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fused, as the engine runs it (engine/backend.make_optimizer): one op for all tensors.
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5, fused=True) if self.params else None

    def _loss(self, pixels):
        from aurora_ds.backbones import forward_features

        feats = forward_features(self.model, self.spec, {**self.batch, "pixel_values": pixels})
        return sum(f.float().pow(2).sum() for f in feats.values())

    def forward_backward(self):
        from torch._inductor import metrics

        pixels = self.batch["pixel_values"].detach().requires_grad_(self.base == "floor")
        before = metrics.generated_kernel_count
        self.loss(pixels).backward()
        if self.compiled and self.generated_kernels is None:  # the first call compiled both graphs
            self.generated_kernels = metrics.generated_kernel_count - before

    def step(self):
        self.forward_backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def kernel_counts(self) -> dict:
        """Kernel-launching ops of one forward + backward from gradients set to None (no ``.grad``
        accumulation), after one more step (so that the count is a steady step's, whatever
        ``--steps``), the adapted-layer calls in it, and the ops of one (fused) AdamW step."""
        from .kernels import count_compiled, count_kernels

        self.step()  # what is made at a first use (groups learnt from the calls before) is counted made
        self.model.zero_grad(set_to_none=True)
        calls = []
        # (not while compiled: a hook added now would recompile the step; its eager twin counts the calls)
        hooks = [] if self.compiled else [
            m.register_forward_hook(lambda *_: calls.append(1)) for m in self.adapted]
        try:
            if not self.compiled:
                ops = count_kernels(self.forward_backward)
            else:
                ops = count_compiled(self.forward_backward, self.generated_kernels)
        finally:
            for h in hooks:
                h.remove()
        optimizer_ops = 0
        if self.optimizer is not None:
            if not self.optimizer.state:  # the first step creates the state: count a later one
                self.optimizer.step()
            ops_by_name = count_kernels(self.optimizer.step)
            # Its reads of the step counts: CPU tensors on a GPU too (the default, capturable=False).
            ops_by_name.pop("_local_scalar_dense", None)
            optimizer_ops = sum(ops_by_name.values())
            self.optimizer.zero_grad(set_to_none=True)
        return {"kernel_ops": sum(ops.values()), "kernel_ops_by_name": dict(ops.most_common()),
                "adapted_calls": len(calls), "optimizer_kernel_ops": optimizer_ops}

    def row(self, job: dict) -> dict:
        return {**{k: job[k] for k in ("size", "backbone")}, "method": self.method,
                "trainable": sum(p.numel() for p in self.params),
                "total": sum(p.numel() for p in self.model.parameters()), **self.info}


def _setup(job: dict):
    import dataclasses

    import torch

    from aurora_ds.backbones import example_batch, get_spec

    if job["device"] == "cpu":
        torch.set_num_threads(job["threads"])
    spec = get_spec(job["backbone"])
    if job["image_size"]:  # a cap: smaller images use the first position embeddings; larger would not fit
        spec = dataclasses.replace(spec, image_size=min(job["image_size"], spec.image_size))
    torch.manual_seed(1)
    batch = {k: v.to(job["device"]) for k, v in example_batch(spec, job["batch"], job["seq_len"]).items()}
    return spec, batch


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure_interleaved(job: dict, methods: list[str]) -> list[dict]:
    """Every configuration in this process, timed round by round in alternating order."""
    import torch

    spec, batch = _setup(job)
    cuda = job["device"] == "cuda"
    configs, rows = [], []
    for method in methods:
        try:
            configs.append(Config(job, method, batch, spec))
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            if method in ("floor", "aurora"):
                raise
            rows.append({"size": job["size"], "backbone": job["backbone"], "method": method,
                         "skipped": f"{type(e).__name__}: {e}"[:300]})
            print(f"[step] {job['size']} {method}: skipped ({rows[-1]['skipped']})", flush=True)
    wall = {c.method: [] for c in configs}
    cpu = {c.method: [] for c in configs}
    peak = {c.method: 0.0 for c in configs}
    for r in range(job["warmup"] + job["steps"]):
        for c in configs if r % 2 == 0 else configs[::-1]:
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            c.step()
            if cuda:
                torch.cuda.synchronize()
                peak[c.method] = max(peak[c.method], (torch.cuda.max_memory_allocated() - base) / 2**20)
            if r >= job["warmup"]:
                wall[c.method].append(time.perf_counter() - t0)
                cpu[c.method].append(time.process_time() - c0)
    counts = {c.method: c.kernel_counts() for c in configs}
    for c in configs:
        n = counts[c.method]
        if c.method != c.base:  # compiled: the eager twin's calls, against the compiled floor where there is one
            n["adapted_calls"] = counts.get(c.base, {}).get("adapted_calls", 0)
        floor = counts.get("floor" + COMPILED if c.method != c.base else "floor", counts["floor"])
        n["ops_per_adapted_call"] = (n["kernel_ops"] - floor["kernel_ops"]) / n["adapted_calls"] if n["adapted_calls"] else None
        w = wall[c.method]
        rows.append({**c.row(job), **n, "step_s": statistics.median(w), "step_times_s": w,
                     "cpu_s": statistics.median(cpu[c.method]), "cpu_times_s": cpu[c.method], "samples_per_s": job["batch"] / statistics.median(w),
                     "peak_memory_mb": peak[c.method] if cuda else None,
                     "memory_measure": "cuda max_memory_allocated - before the step" if cuda else None})
    order = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda row: order[row["method"]])


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS record (VmHWM) afresh, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def measure_memory(job: dict) -> dict:
    """Peak memory growth of one configuration's steps, in this (fresh) process: the peak RSS
    record is reset after building, so a transient of the build does not count."""
    from .report import current_rss_mb, peak_rss_mb

    spec, batch = _setup(job)
    config = Config(job, job["method"], batch, spec)
    rss_after_build = current_rss_mb()
    reset = _reset_peak_rss()
    for _ in range(max(1, job["warmup"]) + 1):
        config.step()
    peak = _vm_hwm_mb() if reset else peak_rss_mb()
    return {"method": job["method"], "peak_memory_mb": peak - rss_after_build,
            "memory_measure": ("VmHWM (reset after build)" if reset else "ru_maxrss") + " - RSS after build",
            "rss_after_build_mb": rss_after_build}


def run_isolated(job: dict) -> dict:
    """``measure_memory(job)`` in a fresh interpreter; its result is the last line it prints."""
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
    """Per size, each configuration over the floor and Aurora over each competitor: the median of
    per-round time ratios with their min and max, CPU-time and memory ratios."""
    out = {}
    for size in dict.fromkeys(r["size"] for r in rows):
        by = {r["method"]: r for r in rows if r["size"] == size and "skipped" not in r}
        pairs = [(m, "floor") for m in by if m != "floor"] + [("aurora", m) for m in by if m not in ("aurora", "floor")]
        if "floor" + COMPILED in by:  # compiled steps against the compiled floor too
            pairs += [(m, "floor" + COMPILED) for m in by if m.endswith(COMPILED) and m != "floor" + COMPILED]
        out[size] = {}
        for a, b in pairs:
            out[size][f"{a}/{b}"] = {
                key: _spread([x / y for x, y in zip(by[a][f"{times}_times_s"], by[b][f"{times}_times_s"])])
                for key, times in (("time", "step"), ("cpu_time", "cpu"))}
            out[size][f"{a}/{b}"]["memory"] = ratio(by[a]["peak_memory_mb"], by[b]["peak_memory_mb"])
            out[size][f"{a}/{b}"]["kernel_ops"] = ratio(by[a]["kernel_ops"], by[b]["kernel_ops"])
        out[size]["trainable"] = {m: r["trainable"] for m, r in by.items()}
    return out


def _label(r: dict) -> str:
    extra = [f"r={r[k]}" for k in ("lora_rank", "vera_rank") if k in r]
    return r["method"] + (f" ({', '.join(extra)})" if extra else "")


def markdown(results: dict) -> str:
    floor = {r["size"]: r["kernel_ops"] for r in results["runs"] if r["method"] == "floor"}
    rows = [[r["size"], _label(r), "skipped: " + r["skipped"]] + [""] * 9 if "skipped" in r else
            [r["size"], _label(r), f"{r['trainable']:,}", f"{r['step_s']:.3f}", f"{r['cpu_s']:.3f}",
             f"{r['samples_per_s']:.2f}", fmt(r["peak_memory_mb"], ".0f"), f"{r['kernel_ops']:,}",
             f"{r['kernel_ops'] / floor[r['size']]:.3f}", r["optimizer_kernel_ops"], r["adapted_calls"],
             fmt(r["ops_per_adapted_call"], ".1f")]
            for r in results["runs"]]
    text = table(["size", "method", "trainable", "step s (median)", "CPU s (median)", "samples/s", "peak memory MB",
                  "kernel ops/step", "× floor", "AdamW ops", "adapted calls", "ops per adapted call"], rows)
    def spread(v):
        return f"{v['median']:.3f} ({v['min']:.3f}–{v['max']:.3f})"

    ratio_rows = [[size, pair, spread(v["time"]), spread(v["cpu_time"]), fmt(v["memory"], ".3f"),
                   fmt(v["kernel_ops"], ".3f")]
                  for size, r in results["ratios"].items() for pair, v in r.items() if pair != "trainable"]
    text += "\n" + table(["size", "ratio", "wall time: median of rounds (min–max)", "CPU time: the same",
                          "peak memory", "kernel ops"], ratio_rows)
    m, c = results["machine"], results["config"]
    return text + f"\nMachine: {m['cpus_usable']} usable CPUs, torch {m['torch']}, device {m['device']}, " \
                  f"{c['precision']}, batch {c['batch']}, {c['steps']} interleaved rounds, " \
                  f"{c['threads'] if c['device'] == 'cpu' else 'n/a'} threads.\n"


def plot(results: dict, out: str) -> list[str]:
    """Time and memory of each configuration relative to the floor, one bar group per size."""
    sizes = list(results["ratios"])
    methods = list(dict.fromkeys(r["method"] for r in results["runs"] if "skipped" not in r and r["method"] != "floor"))
    paths = []
    for key, label in (("time", "step time"), ("memory", "peak memory"), ("kernel_ops", "kernel ops")):
        series = {}
        for m in methods:
            values = [results["ratios"][s].get(f"{m}/floor", {}).get(key) for s in sizes]
            series[m] = [v["median"] if isinstance(v, dict) else v for v in values]
        path = os.path.join(out, f"step_{key}.png")
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
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not {"floor", "aurora"} <= set(methods) or {m.removesuffix(COMPILED) for m in methods} - set(METHODS):
        raise SystemExit(f"--methods must include floor and aurora, from {list(METHODS)} (each may end in {COMPILED})")
    if len([m for m in methods if m.endswith(COMPILED) and m != "floor" + COMPILED]) > 1:
        # torch.compile (2.14) fails with an internal error ("lift_tracked_freevar_to_input ...") when a
        # second adapted model is compiled in the same process; one run per compiled method instead.
        raise SystemExit(f"--methods: one adapted method with {COMPILED} per run (besides floor{COMPILED})")
    rows = []
    for size in sizes:
        backbone, rank = SIZES[size]
        job = {"size": size, "backbone": backbone, "rank": rank, "device": device, "precision": args.precision,
               "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
               "image_size": args.image_size, "seq_len": args.seq_len}
        timed = measure_interleaved(job, methods)
        for row in timed:
            if args.isolate and device == "cpu" and "skipped" not in row:
                row.update(run_isolated({**job, "method": row["method"]}))
            if "skipped" not in row:
                print(f"[step] {size} {row['method']}: {row['step_s']:.3f} s/step (CPU {row['cpu_s']:.3f} s), "
                      f"{fmt(row['peak_memory_mb'], '.0f', ' MB')}, {row['trainable']:,} trainable, "
                      f"{row['kernel_ops']:,} kernel ops (+{row['optimizer_kernel_ops']} AdamW)", flush=True)
        rows += timed
    results = {"machine": machine(), "config": {**cli_config(args), "device": device}, "runs": rows,
               "ratios": summarise(rows)}
    os.makedirs(args.out, exist_ok=True)
    results["plots"] = plot(results, args.out)
    for path in write(args.out, "step", results, markdown(results)):
        print(f"[step] wrote {path}")
    return 0


if __name__ == "__main__":
    print(json.dumps(measure_memory(json.loads(sys.argv[1]))))

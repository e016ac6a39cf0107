"""``aurora-plan``: how much memory per GPU (and per node) Aurora needs under ZeRO-3.

Two estimates side by side, so a user can see what a bigger backbone costs:

* DeepSpeed's own ``estimate_zero3_model_states_mem_needs``, which assumes every parameter is
  trained with Adam in mixed precision (18 bytes per parameter). That is what full fine-tuning
  would need, and the number most people have seen before.
* Aurora's: the backbone is frozen, so it only costs its model copy (partitioned, or on the CPU
  with parameter offload) plus the layers gathered at once; optimizer states exist for the
  Aurora parameters alone.

The backbone is built on the meta device, so counting a billion-parameter model allocates
nothing. Activations are not estimated: they depend on batch size and sequence length.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import textwrap

import torch

from .backbones import PRECISIONS

BYTES_PER_PARAM = {name: dtype.itemsize for name, dtype in PRECISIONS.items()}
# fp32 master copy 4 + Adam moments 8 + fp32 gradient 4, per trainable parameter.
TRAIN_STATE_BYTES = 16
# Gathered layer plus the next one prefetched while it runs.
PREFETCH_FACTOR = 2
# stage3_max_live_parameters in ds_configs/zero3*.json: ZeRO-3 keeps up to this many parameters
# gathered (those it will reuse soon, e.g. the last forward layers for the backward pass).
MAX_LIVE_PARAMETERS = 100_000_000
# DeepSpeed's default stage3_param_persistence_threshold (also in ds_configs/zero3*.json).
PERSISTENCE_THRESHOLD = 100_000
GIB = 2**30

ACTIVATIONS_NOTE = (
    "Activations are not included: they grow with micro-batch size and sequence length "
    "(image patches, text tokens, video frames). To cut them, train with "
    "--set engine.activation_checkpointing=true (non-reentrant checkpointing) and/or a smaller "
    "micro-batch with gradient accumulation."
)


# ---- layouts: which parallel layout, and how fast ------------------------------------------------
#
# A frozen backbone with ~0.1 M trained parameters: ZeRO-3 buys memory for the frozen weights only,
# and pays for it with all-gathers of the backbone every step. Five layouts, each a shipped config:

LAYOUTS = {
    "replicated": "the whole frozen backbone on every GPU (ZeRO stage 2 for the Aurora states): no parameter gathers",
    "zero3": "backbone partitioned over all GPUs, all-gathered layer by layer in forward and backward",
    "zero3_offload": "ZeRO-3 with the partitions in CPU memory, copied to the GPU for every gather",
    "zero3_hpz": "ZeRO++ hierarchical partitioning: a second copy partitioned inside each node, so the "
                 "backward gathers stay on the node's links",
    "zero3_hpz_quant": "hpZ with the frozen weights held and gathered as int8 (CUDA kernels only)",
}
# Prefer the earlier layout when estimates tie (simpler, fewer moving parts).
PREFERENCE = ("replicated", "zero3_hpz", "zero3_hpz_quant", "zero3", "zero3_offload")

# Bandwidths in GB/s per GPU: effective all-gather bus bandwidth (what one GPU receives per second).
INTRA_BW = {"nvlink": 300.0, "pcie": 20.0}
# Network links in Gb/s per GPU (one NIC per GPU); effective 80 % of line rate.
NETWORK_EFFICIENCY = 0.8
HOST_BW = 20.0  # PCIe host <-> GPU, GB/s, for parameter offload
LATENCY_S = 30e-6  # per collective call
# ZeRO-3's cost per call of a module that holds parameters (forward or backward): its hooks fetch
# the module's parameters and release them again. On 2 CPU cores with gloo aurora-bench gather-fit
# fitted 0.89 ms (with 0.14 ms per collective, 0.67 GB/s and 1.32 s per GB called); on GPUs 50 us
# is an assumption (host-side Python hooks and bookkeeping; nothing was measured on a GPU).
MODULE_OVERHEAD_S = 50e-6
# ZeRO-3's per-call work that grows with the called module's parameter bytes, gathered or not,
# in seconds per GB of parameters called. Measured on 2 shared CPU cores with gloo (aurora-bench
# gather-fit); 0 on GPUs is an assumption.
MODULE_BYTES_COST = 0.0
# How often the retrieval objective calls each module per micro-batch, (forward, backward): the
# vision tower runs the momentum (EMA) forward and the training forward; the text encoder the
# momentum, contrastive and matching forwards; its cross-attention only the matching one. A
# backward call for each forward that needs gradients.
CALLS = {"image": (2, 1), "text": (3, 2), "cross": (1, 1), "query": (3, 2)}
TFLOPS = 200.0  # effective dense bf16/fp16 TFLOPS per GPU (about 30-60 % of an A100/H100 peak)
RUNTIME_RESERVE = 1.5 * GIB  # CUDA context, NCCL buffers, allocator fragmentation
TEXT_TOKENS = 35
QUERY_TOKENS = 32
# Retrieval trains ITC (one pass of each tower) and ITM (the fusion encoder on the positive pair
# and two hard negatives): the text side runs about three times per sample.
TEXT_PASSES = 3
# Bytes kept for backward per linear input/output element: the frozen layer's input is kept for
# Aurora's down-projection gradient, plus norms, GELU and attention temporaries.
ACTIVATION_FACTOR = 1.5


@functools.lru_cache(maxsize=None)
def count_parameters(backbone: str, rank: int = 32, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> dict:
    """Parameter counts of ``backbone`` with Aurora at ``rank``, split the way ZeRO-3 stores them.

    Tensors with at most ``persistence_threshold`` elements are kept whole on every GPU
    ("persistent"); the rest are partitioned. The largest layer is the largest sum of one
    module's direct parameters: what ZeRO-3 gathers at once.
    """
    from aurora_ds import AuroraConfig, inject_aurora
    from aurora_ds.backbones import build_backbone, get_spec

    with torch.device("meta"):
        model = build_backbone(backbone)
    handle = inject_aurora(model, AuroraConfig(rank=rank, backbone=backbone))
    report = handle.parameter_report()
    aurora_ids = {id(p) for _, p in handle.named_aurora_parameters()}
    persistent = {"backbone": 0, "aurora": 0}
    persistent_tensors = 0
    for p in model.parameters():
        if p.numel() <= persistence_threshold:
            persistent["aurora" if id(p) in aurora_ids else "backbone"] += p.numel()
            persistent_tensors += 1
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    largest_tensor = max(p.numel() for n, p in model.named_parameters() if id(p) not in aurora_ids)
    calls = module_calls(model, get_spec(backbone).family, persistence_threshold)
    return {
        "total": report["total"],
        "backbone": report["backbone"],
        "aurora": report["aurora"],
        "backbone_persistent": persistent["backbone"],
        "aurora_persistent": persistent["aurora"],
        "persistent_tensors": persistent_tensors,
        "largest_layer": largest,
        "largest_tensor": largest_tensor,
        **calls,
        **linear_shapes(model, get_spec(backbone)),
    }


def call_kind(name: str, family: str) -> str:
    """Which pass structure of :data:`CALLS` a module (by its qualified name) follows."""
    lower = name.lower()
    if family == "timm" or "vision" in lower or "visual" in lower:
        return "image"
    if "crossattention" in lower:
        return "cross"
    return "query" if "qformer" in lower else "text"


def module_calls(model, family: str, persistence_threshold: int) -> dict:
    """Per micro-batch, the calls of modules that hold parameters (``module_calls``), those of
    them that gather (``gathering_calls``: the module holds a partitioned parameter, above the
    persistence threshold), the parameter elements those calls touch (``called_numel``, partitioned
    or not) and the elements ZeRO-3 gathers in forward and backward calls
    (partitioned parameters times their module's calls). The shared factor sets are called by
    every adapted layer; everything else as :data:`CALLS` says for its kind."""
    from aurora_ds.aurora.layer import AuroraLinear

    per_module = {}
    for name, m in model.named_modules():
        if isinstance(m, AuroraLinear):
            fwd, bwd = CALLS[call_kind(name, family)]
            for part in (m.source.down, m.target.up):
                f, b = per_module.get(id(part), (0, 0))
                per_module[id(part)] = (f + fwd, b + bwd)
    calls = gathers = called = fwd_numel = bwd_numel = 0
    for name, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if not params:
            continue
        fwd, bwd = per_module.get(id(m), CALLS[call_kind(name, family)])
        split = sum(p.numel() for p in params if p.numel() > persistence_threshold)
        calls += fwd + bwd
        gathers += (fwd + bwd) * (split > 0)
        called += (fwd + bwd) * sum(p.numel() for p in params)
        fwd_numel += fwd * split
        bwd_numel += bwd * split
    return {"module_calls": calls, "gathering_calls": gathers, "called_numel": called, "gathered_fwd": fwd_numel,
            "gathered_bwd": bwd_numel}


def linear_shapes(model, spec) -> dict:
    """Multiply-accumulates and input widths of the linear layers per token, split by what they
    see: image tokens (vision tower, cross-attention keys/values), Q-Former queries, or text;
    and the patch size (the first strided convolution). Inputs of the activation and compute
    estimates."""
    out = {"image_macs": 0, "query_macs": 0, "text_macs": 0, "image_width": 0, "query_width": 0, "text_width": 0}
    patch = 16
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.stride[0] > 1:
            patch = m.stride[0]
            break
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear):
            continue
        lower = name.lower()
        if spec.family == "timm" or "vision" in lower or "visual" in lower or (
                "crossattention" in lower and ("key" in lower or "value" in lower)):
            kind = "image"
        elif "qformer" in lower:
            kind = "query"
        else:
            kind = "text"
        out[f"{kind}_macs"] += m.in_features * m.out_features
        out[f"{kind}_width"] += m.in_features + m.out_features
    out["patch_size"] = patch
    return out


def deepspeed_estimate(total_params: int, largest_layer_params: int, gpus: int, nodes: int, offload: bool) -> dict:
    """DeepSpeed's estimator for training *every* parameter (params and optimizer offloaded with
    ``offload``; ZeRO init as our builder does; DeepSpeed's default 1.5 buffer factor)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, largest = estimate_zero3_model_states_mem_needs(
        total_params,
        largest_layer_params,
        num_gpus_per_node=gpus // nodes,
        num_nodes=nodes,
        cpu_offload=offload,
        cpu_offload_params=offload,
        zero_init=True,
    )
    return {"gpu_bytes": gpu, "cpu_bytes_per_node": cpu, "largest_layer_bytes": largest}


def aurora_estimate(counts: dict, gpus: int, nodes: int, offload: bool, precision: str) -> dict:
    """Aurora's model states in bytes, per GPU and per node (CPU).

    Persistent tensors stay whole on every GPU, also with offload (DeepSpeed keeps them on the
    local device). Partitioned tensors are split over all GPUs, or with ``offload`` live on the
    CPU, one share per node. Optimizer states are for the Aurora parameters only and stay on GPU
    (``ds_configs/zero3_offload.json`` offloads parameters, not the optimizer).
    """
    nbytes = BYTES_PER_PARAM[precision]
    backbone_split = counts["backbone"] - counts["backbone_persistent"]
    aurora_split = counts["aurora"] - counts["aurora_persistent"]

    def model_copy(persistent: int, split: int) -> tuple[float, float]:
        gpu = nbytes * persistent + (0 if offload else nbytes * split / gpus)
        cpu = nbytes * split / nodes if offload else 0
        return gpu, cpu

    backbone_gpu, backbone_cpu = model_copy(counts["backbone_persistent"], backbone_split)
    aurora_gpu, aurora_cpu = model_copy(counts["aurora_persistent"], aurora_split)
    states_gpu = aurora_gpu + TRAIN_STATE_BYTES * counts["aurora"] / gpus
    gathered = max(MAX_LIVE_PARAMETERS, PREFETCH_FACTOR * counts["largest_layer"])
    working_set = nbytes * min(gathered, backbone_split + aurora_split)
    return {
        "backbone_gpu_bytes": int(backbone_gpu),
        "working_set_gpu_bytes": int(working_set),
        "aurora_states_gpu_bytes": int(states_gpu),
        "gpu_bytes": int(backbone_gpu + working_set + states_gpu),
        "cpu_bytes_per_node": int(backbone_cpu + aurora_cpu),
    }


def plan(backbone: str, gpus_list, nodes: int = 1, offload: bool = False, precision: str = "bf16",
         rank: int = 32, persistence_threshold: int = PERSISTENCE_THRESHOLD, gpu_memory_gib: float = 80.0,
         batch: int = 8, image_size: int = 0, frames: int = 1, checkpointing: bool = False,
         intra_bw: float = INTRA_BW["nvlink"], inter_gbit: float = 200.0, tflops: float = TFLOPS,
         cuda: bool = True, gpus_per_node: int = 0, module_overhead: float = MODULE_OVERHEAD_S,
         latency: float = LATENCY_S, module_bytes_cost: float = MODULE_BYTES_COST,
         host_memory_gib: float = 0.0, checkpoint_precision: str = "") -> list[dict]:
    """One dict per GPU count in ``gpus_list`` (total GPUs over ``nodes`` nodes, or with
    ``gpus_per_node`` as many nodes as needed): parameter counts, DeepSpeed's full-training
    estimate, Aurora's ZeRO-3 estimate, and every layout's memory (training and loading),
    traffic and step time with the recommended one (``layouts``, ``recommended``, ``reason``),
    and ``warnings`` where a node's ``host_memory_gib`` cannot hold what its ranks load from a
    checkpoint in ``checkpoint_precision`` (default: ``precision``); all sizes in bytes."""
    from aurora_ds import AuroraConfig
    from aurora_ds.backbones import get_spec

    get_spec(backbone)
    AuroraConfig(rank=rank)  # a bad rank fails here, before the slow build
    for name in (precision, checkpoint_precision or precision):
        if name not in BYTES_PER_PARAM:
            raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {name!r}")
    if nodes <= 0:
        raise ValueError(f"nodes must be positive, got {nodes}")
    gpus_list = list(gpus_list)
    for gpus in gpus_list:
        if gpus <= 0:
            raise ValueError(f"gpus must be positive, got {gpus}")
        if gpus_per_node and gpus > gpus_per_node and gpus % gpus_per_node:
            raise ValueError(f"{gpus} GPUs are not whole nodes of {gpus_per_node}")
        if not gpus_per_node and gpus % nodes:
            raise ValueError(f"{gpus} GPUs cannot be split evenly over {nodes} nodes")
    if batch <= 0 or frames <= 0:
        raise ValueError(f"batch and frames must be positive, got {batch} and {frames}")
    counts = count_parameters(backbone, rank, persistence_threshold)
    image_size = image_size or get_spec(backbone).image_size
    rows = []
    for gpus in gpus_list:
        n = max(1, gpus // gpus_per_node) if gpus_per_node else nodes
        per_node = gpus // n
        layouts = layout_estimates(counts, gpus, per_node, precision, batch, image_size, frames, checkpointing,
                                   intra_bw, network(inter_gbit), latency=latency, tflops=tflops,
                                   module_overhead=module_overhead, module_bytes_cost=module_bytes_cost, cuda=cuda,
                                   checkpoint_nbytes=BYTES_PER_PARAM[checkpoint_precision or precision])
        best, why = recommend(layouts, gpu_memory_gib * GIB, per_node, n, cuda, host_memory_gib * GIB)
        rows.append({
            "backbone": backbone,
            "gpus": gpus,
            "nodes": n,
            "gpus_per_node": per_node,
            "offload": offload,
            "precision": precision,
            "rank": rank,
            "params": dict(counts),
            "deepspeed_full_training": deepspeed_estimate(
                counts["total"], counts["largest_layer"], gpus, n, offload),
            "aurora": aurora_estimate(counts, gpus, n, offload, precision),
            "activations_included": False,
            "layout_inputs": {"gpu_memory_gib": gpu_memory_gib, "batch": batch, "image_size": image_size,
                              "frames": frames, "activation_checkpointing": checkpointing, "intra_gbyte_s": intra_bw,
                              "inter_gbit_s": inter_gbit, "tflops": tflops, "cuda": cuda,
                              "module_overhead_s": module_overhead, "latency_s": latency,
                              "module_bytes_cost_s_per_gb": module_bytes_cost},
            "layouts": layouts,
            "recommended": best,
            "reason": why,
        })
        rows[-1]["warnings"] = host_memory_warnings(rows[-1], host_memory_gib * GIB)
    return rows


def choose_layout(cfg, world_size: int, per_node: int) -> dict:
    """``--ds-config auto``: the recommendation for this run (its backbone, precision, micro-batch,
    image size, frames, world size, GPUs per node, and this GPU's memory when there is one)."""
    cuda = torch.cuda.is_available()
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB
    if cuda:
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    else:  # CPU ranks share the host's memory
        memory = host / max(1, per_node)
    per_node = per_node if world_size % max(1, per_node) == 0 else world_size
    row = plan(cfg.backbone.name, [world_size], precision=cfg.engine.precision, rank=cfg.aurora.rank,
               gpu_memory_gib=memory, batch=cfg.optim.batch_size, image_size=cfg.data.image_size,
               frames=cfg.data.num_frames if cfg.data.media == "video" else 1,
               checkpointing=cfg.engine.activation_checkpointing, cuda=cuda, gpus_per_node=per_node,
               host_memory_gib=host)[0]
    return {"ds_config": row["recommended"], "reason": row["reason"], "row": row}


def format_table(rows: list[dict]) -> str:
    """The plan as a plain-text table in GiB, with a header saying what was counted."""
    first = rows[0]
    p = first["params"]
    w = 11
    lines = [
        f"{first['backbone']}: {p['total'] / 1e6:,.1f}M params = {p['backbone'] / 1e6:,.1f}M frozen backbone "
        f"+ {p['aurora']:,} Aurora (rank {first['rank']}); largest layer {p['largest_layer'] / 1e6:,.1f}M",
        f"{first['precision']}, {first['nodes']} node(s), backbone offload to CPU "
        f"{'on' if first['offload'] else 'off'}; GiB of model states per GPU and per node",
        "",
        f"{'':>6} | {'DeepSpeed: all trained':^{2 * w + 1}} | {'Aurora: backbone frozen':^{5 * w + 4}}",
        f"{'GPUs':>6} | " + " ".join(f"{h:>{w}}" for h in ("GPU", "CPU/node")) + " | "
        + " ".join(f"{h:>{w}}" for h in ("backbone", "gathered", "Aurora", "GPU total", "CPU/node")),
    ]
    for r in rows:
        ds, au = r["deepspeed_full_training"], r["aurora"]
        left = [ds["gpu_bytes"], ds["cpu_bytes_per_node"]]
        right = [au["backbone_gpu_bytes"], au["working_set_gpu_bytes"], au["aurora_states_gpu_bytes"],
                 au["gpu_bytes"], au["cpu_bytes_per_node"]]
        lines.append(f"{r['gpus']:>6} | " + " ".join(f"{b / GIB:>{w}.2f}" for b in left) + " | "
                     + " ".join(f"{b / GIB:>{w}.2f}" for b in right))
    lines += [
        "",
        "backbone: frozen weights kept on each GPU (small tensors whole, a share of the rest);",
        "gathered: parameters ZeRO-3 keeps gathered: up to stage3_max_live_parameters (1e8 in the",
        "  shipped configs), at least the largest layer plus the next one prefetched;",
        "Aurora: its weights, fp32 master copy, Adam moments and gradients.",
        *textwrap.wrap(ACTIVATIONS_NOTE, 100, break_on_hyphens=False),
    ]
    if "layouts" in first:
        lines += ["", format_layouts(rows)]
    return "\n".join(line.rstrip() for line in lines)


def format_layouts(rows: list[dict]) -> str:
    """Per GPU count: every layout's memory, traffic and estimated step time; * marks the
    recommended one, followed by the reason."""
    i = rows[0]["layout_inputs"]
    lines = [f"Layouts: micro-batch {i['batch']}, {i['image_size']} px x {i['frames']} frame(s), "
             f"{i['gpu_memory_gib']:.0f} GiB per GPU, links {i['intra_gbyte_s']:g} GB/s in a node, "
             f"{i['inter_gbit_s']:g} Gb/s per GPU between nodes, {i['tflops']:g} TFLOPS effective, "
             f"ZeRO-3 {i['module_overhead_s'] * 1e6:g} us per module call"]
    head = ("states GiB", "activ. GiB", "load GPU GiB", "load host/node", "intra GB", "inter GB", "step ms",
            "samples/s/GPU")
    for r in rows:
        lines += ["", f"{r['gpus']} GPUs = {r['nodes']} node(s) x {r['gpus_per_node']}:",
                  f"  {'layout':<17}" + " ".join(f"{h:>13}" for h in head)]
        for name, e in r["layouts"].items():
            mark = "*" if name == r["recommended"] else " "
            cells = [e["model_states_bytes"] / GIB, e["activation_bytes"] / GIB, e["loading_gpu_bytes"] / GIB,
                     e["loading_host_bytes_per_node"] / GIB, e["intra_node_bytes"] / 1e9,
                     e["inter_node_bytes"] / 1e9, e["step_s"] * 1e3, e["samples_per_s_per_gpu"]]
            note = f"  ({e['unavailable']})" if "unavailable" in e else ""
            lines.append(f"{mark} {name:<17}" + " ".join(f"{c:>13.2f}" for c in cells) + note)
        lines.append(f"  recommended: {r['recommended']}: {r['reason']}")
    lines += ["", "load GPU GiB / load host/node: peak memory while the backbone is built and loaded from a checkpoint,",
              "on one GPU and on one node's host (all its ranks; replicated builds the whole model on the host first);",
              "intra/inter GB: bytes one GPU receives per step from its node / from other nodes; step ms:",
              "compute estimate + communication at the given bandwidths + ZeRO-3's overhead per module call,",
              "no overlap (an upper bound)."]
    return "\n".join(lines)


SCALING_GPUS = (8, 16, 32, 64, 128, 256, 512, 1024)
SCALING_BACKBONES = ("blip-base-retrieval", "blip2-g-retrieval", "vit-giant")


def plot_scaling(path: str, backbones=SCALING_BACKBONES, gpus=SCALING_GPUS, per_node: int = 8, **kwargs) -> dict:
    """Samples/s per GPU against GPUs, one line per layout, one panel per backbone; returns the
    plotted numbers (and the recommended layout at each point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {}
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.2 * len(backbones), 3.8), squeeze=False)
    for ax, backbone in zip(axes[0], backbones):
        rows = plan(backbone, list(gpus), gpus_per_node=per_node, **kwargs)
        data[backbone] = {name: [r["layouts"][name]["samples_per_s_per_gpu"] for r in rows] for name in LAYOUTS}
        data[backbone]["recommended"] = [r["recommended"] for r in rows]
        for name in LAYOUTS:
            fits = [r["layouts"][name]["gpu_bytes"] <= r["layout_inputs"]["gpu_memory_gib"] * GIB - RUNTIME_RESERVE
                    for r in rows]
            ax.plot(list(gpus), data[backbone][name], marker="o", markersize=3, label=name,
                    linestyle="-" if all(fits) else ":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_title(f"{backbone} ({rows[0]['params']['total'] / 1e6:,.0f}M)", fontsize=10)
    axes[0][0].set_ylabel("samples/s per GPU (model)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return data


def _gpu_counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a GPU count or a comma-separated list like 8,16,64, got {text!r}")
    if any(n <= 0 for n in counts):
        raise argparse.ArgumentTypeError(f"GPU counts must be positive, got {text!r}")
    return counts


def main(argv=None) -> int:
    # The estimator is arithmetic only; naming the accelerator keeps DeepSpeed's detection
    # warning off stdout, which --json output must own.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from aurora_ds.backbones import list_backbones

    parser = argparse.ArgumentParser(
        prog="aurora-plan",
        description="Per-GPU and per-node memory for training Aurora on a backbone under DeepSpeed ZeRO-3.",
    )
    parser.add_argument("--backbone", required=True, help=f"registered backbone: {', '.join(list_backbones())}")
    parser.add_argument("--gpus", required=True, type=_gpu_counts, help="total GPU count, or a list: 8,16,64")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (must divide --gpus)")
    parser.add_argument("--offload", action="store_true", help="frozen backbone partitions on CPU (zero3_offload)")
    parser.add_argument("--precision", choices=sorted(BYTES_PER_PARAM), default="bf16")
    parser.add_argument("--rank", type=int, default=32, help="Aurora rank R")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    layout = parser.add_argument_group("layout recommendation")
    layout.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    layout.add_argument("--host-memory", type=float, default=0.0,
                        help="GiB of host memory per node: warn where the node's ranks cannot load the backbone in it")
    layout.add_argument("--checkpoint-precision", choices=sorted(BYTES_PER_PARAM), default="",
                        help="precision of the checkpoint's weights (default: --precision); a replicated model "
                             "loaded from another precision is converted into a private copy per rank")
    layout.add_argument("--batch", type=int, default=8, help="micro-batch per GPU")
    layout.add_argument("--image-size", type=int, default=0, help="input resolution (0 = the backbone's)")
    layout.add_argument("--frames", type=int, default=1, help="video frames per sample")
    layout.add_argument("--activation-checkpointing", action="store_true")
    layout.add_argument("--intra", default="nvlink",
                        help=f"GPU links inside a node: {' | '.join(INTRA_BW)} or GB/s (default nvlink = {INTRA_BW['nvlink']:g})")
    layout.add_argument("--inter", type=float, default=200.0, help="network Gb/s per GPU between nodes: 100, 200, 400")
    layout.add_argument("--tflops", type=float, default=TFLOPS, help="effective TFLOPS per GPU")
    layout.add_argument("--module-overhead", type=float, default=None,
                        help=f"ZeRO-3 cost per call of a module holding parameters, microseconds (default "
                             f"{MODULE_OVERHEAD_S * 1e6:g}: an assumption for GPUs; 2 shared CPU cores with gloo: "
                             "890 fitted by aurora-bench gather-fit)")
    layout.add_argument("--gather-latency", type=float, default=None,
                        help=f"latency of one collective (each ZeRO-3 call that gathers pays it), microseconds "
                             f"(default {LATENCY_S * 1e6:g}); aurora-bench gather-fit fits it with --module-overhead")
    layout.add_argument("--module-bytes-cost", type=float, default=MODULE_BYTES_COST,
                        help="ZeRO-3's per-call cost per GB of the called module's parameters, gathered or not, "
                             "seconds (default 0: assumed for GPUs; aurora-bench gather-fit measures it)")
    layout.add_argument("--plot", metavar="FILE.png",
                        help="draw modelled samples/s per GPU against 8..1024 GPUs, one line per layout")
    layout.add_argument("--plot-backbones", default=",".join(SCALING_BACKBONES),
                        help="backbones of the --plot panels (comma-separated)")
    args = parser.parse_args(argv)
    try:
        intra = INTRA_BW[args.intra] if args.intra in INTRA_BW else float(args.intra)
    except ValueError:
        parser.error(f"--intra must be one of {sorted(INTRA_BW)} or a number of GB/s, got {args.intra!r}")
    for key in ("module_overhead", "gather_latency", "module_bytes_cost", "tflops"):
        value = getattr(args, key)
        if value is not None and (value < 0 or (key == "tflops" and value == 0)):
            parser.error(f"--{key.replace('_', '-')} must be {'positive' if key == 'tflops' else 'zero or more'}, "
                         f"got {value:g}")
    overhead = MODULE_OVERHEAD_S if args.module_overhead is None else args.module_overhead / 1e6
    latency = LATENCY_S if args.gather_latency is None else args.gather_latency / 1e6
    options = dict(precision=args.precision, rank=args.rank, gpu_memory_gib=args.gpu_memory, batch=args.batch,
                   image_size=args.image_size, frames=args.frames, checkpointing=args.activation_checkpointing,
                   intra_bw=intra, inter_gbit=args.inter, tflops=args.tflops, module_overhead=overhead, latency=latency,
                   module_bytes_cost=args.module_bytes_cost, host_memory_gib=args.host_memory,
                   checkpoint_precision=args.checkpoint_precision)
    try:
        rows = plan(args.backbone, args.gpus, args.nodes, args.offload, **options)
        if args.plot:
            plot_scaling(args.plot, args.plot_backbones.split(","), per_node=rows[0]["gpus_per_node"],
                         **{k: v for k, v in options.items() if k != "image_size"})
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    for warning in sorted({w for r in rows for w in r["warnings"]}):
        print(f"warning: {warning}", file=__import__("sys").stderr)
    if args.plot:
        print(f"wrote {args.plot}", file=__import__("sys").stderr)
    return 0



def network(gbit: float) -> float:
    """GB/s per GPU for a NIC of ``gbit`` Gb/s."""
    return gbit / 8 * NETWORK_EFFICIENCY


def tokens(counts: dict, image_size: int, frames: int = 1) -> dict:
    side = image_size // counts["patch_size"]
    return {"image": (side * side + 1) * frames, "query": QUERY_TOKENS + TEXT_TOKENS, "text": TEXT_TOKENS * TEXT_PASSES}


def activation_bytes(counts: dict, batch: int, image_size: int, frames: int, precision: str,
                     checkpointing: bool = False) -> int:
    """A rough activation estimate: every linear layer's input and output, per token, times a
    factor for what else autograd keeps. Checkpointing keeps about a tenth (one block at a time)."""
    tok = tokens(counts, image_size, frames)
    elements = sum(tok[k] * counts[f"{k}_width"] for k in ("image", "query", "text"))
    total = ACTIVATION_FACTOR * BYTES_PER_PARAM[precision] * batch * elements
    return int(total / 10 if checkpointing else total)


def compute_seconds(counts: dict, batch: int, image_size: int, frames: int, tflops: float) -> float:
    """Forward + backward of a frozen backbone: 2 FLOPs per MAC forward, as many again for the
    input gradients (no weight gradients), per token."""
    tok = tokens(counts, image_size, frames)
    macs = sum(tok[k] * counts[f"{k}_macs"] for k in ("image", "query", "text"))
    return 4 * macs * batch / (tflops * 1e12)


def _split(nbytes: float, gpus: int, per_node: int) -> tuple[float, float]:
    """Bytes one GPU receives in an all-gather of ``nbytes`` over ``gpus`` GPUs: from its own
    node, and from other nodes."""
    return nbytes * (per_node - 1) / gpus, nbytes * (gpus - per_node) / gpus


def layout_estimates(counts: dict, gpus: int, per_node: int, precision: str = "bf16", batch: int = 8,
                     image_size: int = 224, frames: int = 1, checkpointing: bool = False,
                     intra_bw: float = INTRA_BW["nvlink"], inter_bw: float = network(200), host_bw: float = HOST_BW,
                     latency: float = LATENCY_S, tflops: float = TFLOPS, max_live: int = MAX_LIVE_PARAMETERS,
                     module_overhead: float = MODULE_OVERHEAD_S, module_bytes_cost: float = MODULE_BYTES_COST,
                     cuda: bool = True, checkpoint_nbytes: int = 0) -> dict:
    """Per layout: per-GPU memory (model states + activations), memory while loading (GPU and
    host: :func:`loading_estimate`), bytes received per step per GPU
    (intra-node, inter-node, host), and the step time = compute + communication (no overlap:
    an upper bound; DeepSpeed overlaps prefetch with compute when it can). Bandwidths in GB/s.

    ZeRO-3's communication per micro-batch: every call of a module re-gathers its partitioned
    parameters (measured: the backward gathers again what the forward gathered, even when it would
    fit ``max_live``), so the bytes are the partitioned parameters times their modules' calls;
    plus ``module_overhead`` seconds per call of a module that holds parameters (the hooks that
    fetch and release them), plus one collective's ``latency`` per call that gathers. After every
    optimizer step DeepSpeed also re-gathers every persistent tensor, frozen or not, one collective
    each (stage 3's ``_post_step``): a high persistence threshold moves gathers there rather than
    saving them. And each call costs ``module_bytes_cost`` seconds per GB of the called module's
    parameters, gathered or not (measured on CPU; 0 by default: an assumption for GPUs)."""
    nbytes = BYTES_PER_PARAM[precision]
    nodes = gpus // per_node
    split = counts["backbone"] - counts["backbone_persistent"]
    persistent = counts["backbone_persistent"]
    aurora = counts["aurora"]
    acts = activation_bytes(counts, batch, image_size, frames, precision, checkpointing)
    compute = compute_seconds(counts, batch, image_size, frames, tflops)
    fwd, bwd = counts["gathered_fwd"], counts["gathered_bwd"]
    working = nbytes * min(max(max_live, PREFETCH_FACTOR * counts["largest_layer"]), split)
    aurora_states = nbytes * aurora + TRAIN_STATE_BYTES * aurora / gpus
    # Aurora's gradients: reduce-scatter (ZeRO-2/3) or all-reduce, ~2x their bytes over the ring.
    grad_intra, grad_inter = _split(2 * nbytes * aurora, gpus, per_node)
    out = {}
    for name in LAYOUTS:
        if name == "replicated":
            states = nbytes * counts["backbone"] + aurora_states
            intra, inter, host, calls, hooks = grad_intra, grad_inter, 0.0, 2, 0
        else:
            w = 1 if name == "zero3_hpz_quant" else nbytes  # int8 frozen weights
            fwd_i, fwd_o = _split(w * fwd, gpus, per_node)
            if name.startswith("zero3_hpz"):
                # backward gathers from the node's secondary partition: intra-node only
                bwd_i, bwd_o = w * bwd * (per_node - 1) / per_node, 0.0
                secondary = w * split / per_node
            else:
                bwd_i, bwd_o = _split(w * bwd, gpus, per_node)
                secondary = 0
            post_i, post_o = _split(nbytes * (persistent + counts["aurora_persistent"]), gpus, per_node)
            intra = fwd_i + bwd_i + post_i + grad_intra
            inter = fwd_o + bwd_o + post_o + grad_inter
            hooks = counts["module_calls"]
            calls = counts["gathering_calls"] + counts["persistent_tensors"] + 2
            offload = name == "zero3_offload"
            host = w * (fwd + bwd) / gpus if offload else 0.0
            states = (w * persistent + (0 if offload else w * split / gpus) + secondary + working + aurora_states)
        if gpus == 1:
            intra = inter = 0.0
            calls = 0 if name == "replicated" else calls
        comm = (intra / (intra_bw * 1e9) + inter / (inter_bw * 1e9) + host / (host_bw * 1e9)
                + latency * calls + module_overhead * hooks
                + module_bytes_cost * nbytes * counts["called_numel"] / 1e9 * (hooks > 0))
        out[name] = {
            "ds_config": name,
            "description": LAYOUTS[name],
            "model_states_bytes": int(states),
            "activation_bytes": acts,
            "gpu_bytes": int(states + acts),
            "cpu_bytes_per_node": int(nbytes * split / nodes) if name == "zero3_offload" else 0,
            "intra_node_bytes": int(intra),
            "inter_node_bytes": int(inter),
            "host_bytes": int(host),
            "collectives": round(calls),
            "compute_s": compute,
            "comm_s": comm,
            "step_s": compute + comm,
            "samples_per_s_per_gpu": batch / (compute + comm),
            **loading_estimate(counts, gpus, per_node, name, nbytes, cuda, checkpoint_nbytes),
        }
    return out


def loading_estimate(counts: dict, gpus: int, per_node: int, layout: str, nbytes: int, cuda: bool = True,
                     checkpoint_nbytes: int = 0) -> dict:
    """Peak memory per rank while the backbone is built and its checkpoint loaded, above the
    process's runtime: on the GPU, private host memory per rank, and checkpoint pages mapped on
    the host (shared by a node's ranks), for a checkpoint of ``checkpoint_nbytes`` per element
    (default: the run's precision).

    ZeRO-3 layouts are built partitioned (zero.Init: each module whole for a moment, then its
    share kept) and each rank reads only the rows of its share from the files
    (``backbones/loading.py``): the partition, plus the largest module or one tensor's rows in
    flight; with offload the partition lives on the host. ``replicated`` loads through
    ``from_pretrained``, whose parameters are the memory-mapped safetensors themselves when the
    checkpoint is in the run's precision: one copy per node in the page cache, shared by its
    ranks, until DeepSpeed moves it to the GPU; a checkpoint in another precision is converted
    into a private copy per rank. Without CUDA device and host are one memory."""
    checkpoint_nbytes = checkpoint_nbytes or nbytes
    backbone, tensor = nbytes * counts["backbone"], counts.get("largest_tensor", counts["largest_layer"])
    transient = nbytes * max(counts["largest_layer"], tensor / gpus)
    rows = checkpoint_nbytes * tensor / gpus
    mapped = 0.0
    if layout == "replicated":
        device = backbone
        host, mapped = (0.0, backbone) if checkpoint_nbytes == nbytes else (backbone, 0.0)
    elif layout == "zero3_offload":
        device, host = nbytes * counts["largest_layer"], backbone / gpus + rows
    else:
        device, host = backbone / gpus + transient, rows
    if not cuda:  # one memory: what is built on the "device" is on the host
        device, host = 0.0, (host if layout == "replicated" else backbone / gpus + max(transient, rows))
    return {"loading_gpu_bytes": int(device), "loading_host_bytes": int(host),
            "loading_mapped_bytes_per_node": int(mapped),
            "loading_host_bytes_per_node": int(host * per_node + mapped)}


def host_memory_warnings(row: dict, host_memory: float) -> list[str]:
    """Layouts whose loading needs more host memory per node than ``host_memory`` bytes."""
    out = []
    for name, est in row["layouts"].items():
        need = est["loading_host_bytes_per_node"]
        if host_memory and need > host_memory:
            out.append(f"{name}: the {row['gpus_per_node']} ranks of a node need {need / GIB:.1f} GiB of host "
                       f"memory while loading the backbone, more than the node's {host_memory / GIB:.0f} GiB")
    return out


def recommend(layouts: dict, gpu_memory: float, per_node: int, nodes: int, cuda: bool = True,
              host_memory: float = 0.0) -> tuple[str, str]:
    """The fastest layout that fits ``gpu_memory`` bytes per GPU (less the runtime reserve) and,
    when ``host_memory`` (bytes per node) is known, whose loading fits the node's host, and why.

    hpZ is only a layout of its own across nodes with several GPUs each (DeepSpeed turns it off at
    partition size 1; on one node it is ZeRO-3); quantized weights need CUDA."""
    budget = gpu_memory - RUNTIME_RESERVE
    usable = {}
    for name in PREFERENCE:
        est = layouts[name]
        if name.startswith("zero3_hpz") and (nodes < 2 or per_node < 2):
            est["unavailable"] = "needs 2+ nodes with 2+ GPUs each"
        elif name == "zero3_hpz_quant" and not cuda:
            est["unavailable"] = "quantized weights need CUDA"
        elif est["gpu_bytes"] > budget:
            est["unavailable"] = f"needs {est['gpu_bytes'] / GIB:.1f} GiB of {budget / GIB:.1f} usable"
        elif host_memory and est["loading_host_bytes_per_node"] > host_memory:
            est["unavailable"] = (f"loading needs {est['loading_host_bytes_per_node'] / GIB:.1f} GiB of host memory "
                                  f"per node, the node has {host_memory / GIB:.1f}")
        else:
            usable[name] = est
    if not usable:
        name = "zero3_offload"
        return name, (f"nothing fits {gpu_memory / GIB:.0f} GiB per GPU with these activations: the smallest is "
                      f"{name}; turn on activation_checkpointing or lower the micro-batch")
    fastest = min(usable.values(), key=lambda e: e["step_s"])["step_s"]
    name = next(n for n in PREFERENCE if n in usable and usable[n]["step_s"] <= fastest * 1.02)
    est = layouts[name]
    if name == "replicated":
        why = (f"the whole backbone fits ({est['gpu_bytes'] / GIB:.1f} of {budget / GIB:.1f} GiB usable per GPU): "
               "no parameter gathers, only Aurora's gradients are reduced")
    else:
        why = (f"fastest layout that fits: {est['step_s'] * 1e3:.0f} ms/step estimated, "
               f"{est['gpu_bytes'] / GIB:.1f} of {budget / GIB:.1f} GiB usable per GPU"
               + (f"; replicated does not fit ({layouts['replicated']['unavailable']})"
                  if "unavailable" in layouts["replicated"] else ""))
    return name, why


if __name__ == "__main__":
    raise SystemExit(main())

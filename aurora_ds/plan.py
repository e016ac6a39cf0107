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

from .engine.config import PRECISIONS

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


@functools.lru_cache(maxsize=None)
def count_parameters(backbone: str, rank: int = 32, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> dict:
    """Parameter counts of ``backbone`` with Aurora at ``rank``, split the way ZeRO-3 stores them.

    Tensors with at most ``persistence_threshold`` elements are kept whole on every GPU
    ("persistent"); the rest are partitioned. The largest layer is the largest sum of one
    module's direct parameters: what ZeRO-3 gathers at once.
    """
    from aurora_ds import AuroraConfig, inject_aurora
    from aurora_ds.backbones import build_backbone

    with torch.device("meta"):
        model = build_backbone(backbone)
    handle = inject_aurora(model, AuroraConfig(rank=rank, backbone=backbone))
    report = handle.parameter_report()
    aurora_ids = {id(p) for _, p in handle.named_aurora_parameters()}
    persistent = {"backbone": 0, "aurora": 0}
    for p in model.parameters():
        if p.numel() <= persistence_threshold:
            persistent["aurora" if id(p) in aurora_ids else "backbone"] += p.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {
        "total": report["total"],
        "backbone": report["backbone"],
        "aurora": report["aurora"],
        "backbone_persistent": persistent["backbone"],
        "aurora_persistent": persistent["aurora"],
        "largest_layer": largest,
    }


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
         rank: int = 32, persistence_threshold: int = PERSISTENCE_THRESHOLD) -> list[dict]:
    """One dict per GPU count in ``gpus_list`` (total GPUs over ``nodes`` nodes): parameter
    counts, DeepSpeed's full-training estimate and Aurora's estimate, all in bytes."""
    from aurora_ds import AuroraConfig
    from aurora_ds.backbones import get_spec

    get_spec(backbone)
    AuroraConfig(rank=rank)  # a bad rank fails here, before the slow build
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    if nodes <= 0:
        raise ValueError(f"nodes must be positive, got {nodes}")
    gpus_list = list(gpus_list)
    for gpus in gpus_list:
        if gpus <= 0:
            raise ValueError(f"gpus must be positive, got {gpus}")
        if gpus % nodes:
            raise ValueError(f"{gpus} GPUs cannot be split evenly over {nodes} nodes")
    counts = count_parameters(backbone, rank, persistence_threshold)
    return [
        {
            "backbone": backbone,
            "gpus": gpus,
            "nodes": nodes,
            "gpus_per_node": gpus // nodes,
            "offload": offload,
            "precision": precision,
            "rank": rank,
            "params": dict(counts),
            "deepspeed_full_training": deepspeed_estimate(
                counts["total"], counts["largest_layer"], gpus, nodes, offload),
            "aurora": aurora_estimate(counts, gpus, nodes, offload, precision),
            "activations_included": False,
        }
        for gpus in gpus_list
    ]


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
    return "\n".join(line.rstrip() for line in lines)


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
    args = parser.parse_args(argv)
    try:
        rows = plan(args.backbone, args.gpus, args.nodes, args.offload, args.precision, args.rank)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

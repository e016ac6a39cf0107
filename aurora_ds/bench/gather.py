"""All-gather timing on this machine's communication backend (what ZeRO-3 pays per gathered
module), for calibrating aurora-plan's communication model: ``t = latency + bytes / bandwidth``.

Run under a launcher with 2+ ranks: ``python -m torch.distributed.run --nproc_per_node 2 -m
aurora_ds.bench.gather OUT.json``. The gather is ``all_gather_into_tensor``, as ZeRO-3's.
"""

import json
import statistics
import sys
import time

import torch

from ..dist import all_gather_flat, barrier, comm_device, process_rank, set_compute_device, shutdown, world_size

SIZES = (1_000, 10_000, 100_000, 1_000_000, 4_000_000)  # fp32 elements per rank's shard


def measure(repeats: int = 7) -> dict:
    import deepspeed

    deepspeed.init_distributed()
    set_compute_device(torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu")
    world = world_size()
    rows = []
    for n in SIZES:
        shard = torch.randn(n, device=comm_device())
        times = []
        for i in range(repeats + 1):
            barrier()
            if shard.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            all_gather_flat(shard)
            if shard.is_cuda:
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t0)
        # bytes one rank receives
        rows.append({"elements_per_rank": n, "received_bytes": 4 * n * (world - 1), "seconds": statistics.median(times)})
    # latency: the small gathers (all overhead); bandwidth: what the large ones add on top of it
    latency = min(r["seconds"] for r in rows[:2])
    large = [r for r in rows if r["elements_per_rank"] >= 1_000_000]
    bandwidth = sum(r["received_bytes"] for r in large) / sum(r["seconds"] - latency for r in large) / 1e9
    return {"world_size": world, "rows": rows, "latency_s": latency, "bandwidth_gbyte_s": bandwidth}


if __name__ == "__main__":
    result = measure()
    if process_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=2)
    shutdown()

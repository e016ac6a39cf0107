"""Data pipeline throughput in steady state: the same shards read from local disk and from a
SeaweedFS S3 endpoint (started here), for images and videos, per loader worker count; and shard
writing speed.

Sample data come from shard_tools' generators (real JPEG and MP4 bytes, small so that generating
thousands is cheap) and are converted with its converter, the same code path as real datasets;
reading goes through the training loader (PIL/decord decoding, BLIP's training transforms).

What is measured is what training sees once the workers run: each epoch's first
``--warmup-batches`` batches per worker (worker start-up, the first connections, the shuffle
buffer's fill) are read but not timed. Local and S3 epochs alternate round by round (local, S3;
S3, local; ...) so that a neighbour's load hits both, and the S3/local ratio is taken per round:
the table gives its median and range. Beside it, the CPU time per sample of the whole epoch (this
process, its workers and the S3 server), which the neighbours' load does not move: on a machine
where decoding keeps every core busy, that ratio is what S3 costs in samples/s. Torch runs one
thread per process, as in a loader worker.
"""

import io
import math
import os
import resource
import statistics
import tempfile
import time

from .report import cli_config, machine, table, write

TRAIN_FRACTION = 0.6  # of a generated COCO/MSRVTT set, what its train split gets


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for data.json and data.md")
    p.add_argument("--images", type=int, default=2000, help="COCO-like training images to read per epoch")
    p.add_argument("--videos", type=int, default=300, help="MSRVTT-like training videos to read per epoch")
    p.add_argument("--workers", default="0,2", help="comma-separated loader worker counts")
    p.add_argument("--rounds", type=int, default=3, help="interleaved local/S3 rounds per worker count")
    p.add_argument("--warmup-batches", type=int, default=2, help="batches per worker read before timing starts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=50, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)


def write_shards(dataset, raw, ann, media_dir, out, per_shard):
    """Convert one generated dataset's train split with shard_tools; returns (manifest, seconds)."""
    from shard_tools.convert import convert

    start = time.perf_counter()
    manifest = convert(dataset, [os.path.join(raw, ann)], os.path.join(raw, media_dir), "train", out,
                       maxcount=per_shard, log=io.StringIO())
    return manifest, time.perf_counter() - start


def cpu_seconds(server_pid):
    """CPU time so far of this process, its ended children (an epoch's loader workers, once it is
    over) and the S3 server: what reading costs whatever the neighbours' load."""
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    with open("/proc/%d/stat" % server_pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(r.ru_utime + r.ru_stime for r in own) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_epoch(spec, media, workers, args):
    """One training epoch of ``spec``: (samples, seconds) after the warm-up batches, and all samples."""
    from aurora_ds.data import LoaderConfig, build_loader
    from aurora_ds.data.text import HashTokenizer

    cfg = LoaderConfig(media=media, image_size=args.image_size, num_frames=args.num_frames,
                       batch_size=args.batch_size, num_workers=workers, seed=args.seed, shuffle_buffer=100)
    warmup = args.warmup_batches * max(1, workers)
    start = time.perf_counter()
    timed = total = 0
    loader = build_loader(spec, cfg, HashTokenizer())
    loader.last_epoch = 0  # one epoch: no next epoch's workers reading during the timed tail
    for i, batch in enumerate(loader):
        n = len(batch["media_id"])
        total += n
        if i < warmup:
            start = time.perf_counter()
        else:
            timed += n
    if not timed:
        raise ValueError("%s: the epoch had %d sample(s), all read during the %d warm-up batch(es): read more "
                         "samples (--images/--videos) or fewer --warmup-batches" % (spec.split("::")[0], total, warmup))
    return timed, time.perf_counter() - start, total


def summarize(rounds):
    """Median samples/s per source and the per-round S3/local ratio's median and range."""
    rates = {s: [r[s]["samples"] / r[s]["seconds"] for r in rounds] for s in ("local", "s3")}
    ratios = [s3 / local for local, s3 in zip(rates["local"], rates["s3"])]
    cpu = {s: [1000 * r[s]["cpu_s"] / r[s]["epoch_samples"] for r in rounds] for s in ("local", "s3")}
    return {"local_samples_per_s": statistics.median(rates["local"]),
            "s3_samples_per_s": statistics.median(rates["s3"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "local_cpu_ms_per_sample": statistics.median(cpu["local"]),
            "s3_cpu_ms_per_sample": statistics.median(cpu["s3"]),
            "cpu_ratio": statistics.median(s3 / local for local, s3 in zip(cpu["local"], cpu["s3"]))}


def markdown(results):
    rows = [[r["media"], r["workers"], r["samples"], "%.1f" % r["local_samples_per_s"],
             "%.1f" % r["s3_samples_per_s"], "%.2fx (%.2f-%.2f)" % (r["ratio"], r["ratio_min"], r["ratio_max"]),
             "%.2f / %.2f" % (r["local_cpu_ms_per_sample"], r["s3_cpu_ms_per_sample"]), "%.2fx" % r["cpu_ratio"],
             len(r["rounds"])] for r in results["read"]]
    text = table(["media", "workers", "samples timed", "local samples/s", "S3 samples/s",
                  "S3 / local samples/s, median (range)", "CPU ms per sample, local / S3", "S3 / local CPU",
                  "rounds"], rows)
    rows = [[w["dataset"], w["destination"], w["samples"], "%.1f" % (w["bytes"] / 1e6), "%.2f" % w["seconds"],
             "%.1f" % (w["samples"] / w["seconds"]), "%.1f" % (w["bytes"] / 1e6 / w["seconds"])]
            for w in results["write"]]
    return text + "\n" + table(["shard writing", "destination", "samples", "MB", "seconds", "samples/s", "MB/s"], rows)


def run(args):
    import torch
    from shard_tools.sample import make_coco, make_msrvtt

    from aurora_ds.data import SeaweedServer, storage

    # One thread, as in a loader worker: without workers the main process decodes, and on a busy
    # machine a multi-threaded main process loses far more to oversubscription than it gains.
    torch.set_num_threads(1)

    workers = sorted({int(w) for w in args.workers.split(",")})
    results = {"config": cli_config(args), "machine": machine(), "read": [], "write": []}
    datasets = [("image", "coco", make_coco, args.images, "annotations/coco_karpathy_train.json", ""),
                ("video", "msrvtt", make_msrvtt, args.videos, "annotations/MSRVTT_data.json", "videos/all")]
    with tempfile.TemporaryDirectory(prefix="aurora-bench-") as tmp, SeaweedServer() as server, \
            server.environment():
        bucket = server.create_bucket("aurora-bench")
        storage.s3_client()  # this process's first-use cost out of the figures
        for media, dataset, make, n, ann, media_dir in datasets:
            raw = make(os.path.join(tmp, "raw", dataset), math.ceil(n / TRAIN_FRACTION) + 1, args.seed)
            specs = {}
            for source, out in (("local", os.path.join(tmp, "shards", dataset)),
                                ("s3", "s3://%s/%s" % (bucket, dataset))):
                manifest, seconds = write_shards(dataset, raw, ann, media_dir, out, args.per_shard)
                results["write"].append({
                    "dataset": dataset, "destination": source, "samples": manifest["num_samples"],
                    "bytes": sum(e["bytes"] for e in manifest["shards"].values()), "seconds": seconds})
                specs[source] = "::".join(out + "/" + name for name in sorted(manifest["shards"]))
            for w in workers:
                rounds = []
                for r in range(args.rounds):
                    measured = {}
                    for source in ("local", "s3") if r % 2 == 0 else ("s3", "local"):
                        cpu = cpu_seconds(server.proc.pid)
                        timed, seconds, total = timed_epoch(specs[source], media, w, args)
                        measured[source] = {"samples": timed, "seconds": seconds, "epoch_samples": total,
                                            "cpu_s": cpu_seconds(server.proc.pid) - cpu}
                    rounds.append(measured)
                    print("%s workers=%d round %d: local %.1f, s3 %.1f samples/s" % (
                        media, w, r + 1, *(measured[s]["samples"] / measured[s]["seconds"] for s in ("local", "s3"))),
                        flush=True)
                results["read"].append({"media": media, "workers": w, "samples": rounds[0]["local"]["samples"],
                                        "epoch_samples": rounds[0]["local"]["epoch_samples"],
                                        **summarize(rounds), "rounds": rounds})
    text = markdown(results)
    write(args.out, "data", results, text)
    print(text)
    return 0

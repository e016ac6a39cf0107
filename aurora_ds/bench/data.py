"""Data pipeline throughput: the same shards read from local disk and from a SeaweedFS S3 endpoint
(started here), with 0 and 2 loader workers, for images and videos; and shard writing speed.

Reading rates are reported as ratios against local disk with 0 workers measured in the same run,
so results from different machines compare. Sample data come from shard_tools' generators and
are converted with its converter (the same code path as real datasets).
"""

import io
import itertools
import json
import os
import tempfile
import time


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder for data.json and data.md")
    p.add_argument("--images", type=int, default=500, help="COCO-like images to generate (60%% become train)")
    p.add_argument("--videos", type=int, default=100, help="MSRVTT-like videos to generate")
    p.add_argument("--workers", default="2", help="comma-separated loader worker counts (0 always runs)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-frames", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=20, help="samples per shard")
    p.add_argument("--seed", type=int, default=0)


def write_shards(dataset, raw, ann, media_dir, out, per_shard):
    """Convert one generated dataset's train split with shard_tools; returns (manifest, seconds)."""
    from shard_tools.convert import convert

    start = time.perf_counter()
    manifest = convert(dataset, [os.path.join(raw, ann)], os.path.join(raw, media_dir), "train", out,
                       maxcount=per_shard, log=io.StringIO())
    return manifest, time.perf_counter() - start


def read_rate(spec, media, workers, args, max_batches=None):
    """Samples (media) per second over one epoch of ``spec`` (or its first batches), with
    training transforms."""
    from aurora_ds.data import LoaderConfig, build_loader
    from aurora_ds.data.text import HashTokenizer

    cfg = LoaderConfig(media=media, image_size=args.image_size, num_frames=args.num_frames,
                       batch_size=args.batch_size, num_workers=workers, seed=args.seed, shuffle_buffer=100)
    loader = build_loader(spec, cfg, HashTokenizer())
    start = time.perf_counter()
    n = sum(len(batch["media_id"]) for batch in itertools.islice(loader, max_batches))
    return n, time.perf_counter() - start


def markdown(results):
    lines = ["| media | source | workers | samples | seconds | samples/s | vs local, 0 workers |",
             "|---|---|---|---|---|---|---|"]
    for r in results["read"]:
        lines.append("| %s | %s | %d | %d | %.2f | %.1f | %.2fx |" % (
            r["media"], r["source"], r["workers"], r["samples"], r["seconds"], r["samples_per_s"], r["ratio"]))
    lines += ["", "| shard writing | destination | samples | MB | seconds | samples/s | MB/s |",
              "|---|---|---|---|---|---|---|"]
    for w in results["write"]:
        lines.append("| %s | %s | %d | %.1f | %.2f | %.1f | %.1f |" % (
            w["dataset"], w["destination"], w["samples"], w["bytes"] / 1e6, w["seconds"],
            w["samples"] / w["seconds"], w["bytes"] / 1e6 / w["seconds"]))
    return "\n".join(lines) + "\n"


def run(args):
    from shard_tools.sample import make_coco, make_msrvtt

    from aurora_ds.data import SeaweedServer

    workers = sorted({0} | {int(w) for w in args.workers.split(",")})  # 0 workers is the baseline
    os.makedirs(args.out, exist_ok=True)
    results = {"config": vars(args).copy(), "read": [], "write": []}
    results["config"].pop("run", None)
    datasets = [("image", "coco", make_coco, args.images, "annotations/coco_karpathy_train.json", ""),
                ("video", "msrvtt", make_msrvtt, args.videos, "annotations/MSRVTT_data.json", "videos/all")]
    with tempfile.TemporaryDirectory(prefix="aurora-bench-") as tmp, SeaweedServer() as server, \
            server.environment():
        bucket = server.create_bucket("aurora-bench")
        for media, dataset, make, n, ann, media_dir in datasets:
            raw = make(os.path.join(tmp, "raw", dataset), n, args.seed)
            specs = {}
            for source, out in (("local", os.path.join(tmp, "shards", dataset)),
                                ("s3", "s3://%s/%s" % (bucket, dataset))):
                manifest, seconds = write_shards(dataset, raw, ann, media_dir, out, args.per_shard)
                names = sorted(manifest["shards"])
                results["write"].append({
                    "dataset": dataset, "destination": source, "samples": manifest["num_samples"],
                    "bytes": sum(e["bytes"] for e in manifest["shards"].values()), "seconds": seconds})
                specs[source] = "::".join(out + "/" + name for name in names)
            read_rate(specs["local"], media, 0, args, max_batches=2)  # warm-up: first-use costs out of the baseline
            base = None
            for source in ("local", "s3"):
                for w in workers:
                    samples, seconds = read_rate(specs[source], media, w, args)
                    rate = samples / seconds
                    base = base or rate
                    results["read"].append({"media": media, "source": source, "workers": w, "samples": samples,
                                            "seconds": seconds, "samples_per_s": rate, "ratio": rate / base})
                    print("%s %s workers=%d: %.1f samples/s" % (media, source, w, rate), flush=True)
    with open(os.path.join(args.out, "data.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(results)
    with open(os.path.join(args.out, "data.md"), "w") as f:
        f.write(table)
    print(table)
    return 0

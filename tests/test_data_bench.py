"""``aurora-bench data`` end to end on a tiny generated set (starts its own SeaweedFS): every round
reads the whole epoch from both sources, the warm-up batches are read but not timed, and the
ratios are the per-round ones. (Timings themselves are not asserted.)"""

import json
import statistics

import pytest

from aurora_ds.bench.cli import main

pytestmark = pytest.mark.s3


def test_bench_data_interleaves_local_and_s3_after_a_warm_up(tmp_path):
    rc = main(["data", "--out", str(tmp_path), "--images", "12", "--videos", "4", "--image-size", "32",
               "--num-frames", "2", "--per-shard", "3", "--workers", "0,2", "--rounds", "2",
               "--warmup-batches", "1", "--batch-size", "2"])
    assert rc == 0
    results = json.loads((tmp_path / "data.json").read_text())
    written = {(w["dataset"], w["destination"]): w["samples"] for w in results["write"]}
    assert set(written) == {(d, s) for d in ("coco", "msrvtt") for s in ("local", "s3")}
    assert written[("coco", "local")] == written[("coco", "s3")] >= 12
    assert written[("msrvtt", "local")] == written[("msrvtt", "s3")] >= 4
    rows = {(r["media"], r["workers"]): r for r in results["read"]}
    assert set(rows) == {(m, w) for m in ("image", "video") for w in (0, 2)}
    for (media, workers), row in rows.items():
        epoch = written[("coco" if media == "image" else "msrvtt", "local")]
        assert len(row["rounds"]) == 2
        for measured in row["rounds"]:
            for source in ("local", "s3"):
                assert measured[source]["epoch_samples"] == epoch
                timed = measured[source]["samples"]
                if media == "image":  # 5 shards of 3 images: every warm-up batch (1 per worker) is full
                    assert timed == epoch - 2 * max(1, workers)
                else:
                    assert 0 < timed <= epoch - max(1, workers)
        ratios = [m["s3"]["samples"] / m["s3"]["seconds"] / (m["local"]["samples"] / m["local"]["seconds"])
                  for m in row["rounds"]]
        assert row["ratio"] == pytest.approx(statistics.median(ratios))
        assert row["ratio_min"] == pytest.approx(min(ratios)) and row["ratio_max"] == pytest.approx(max(ratios))
    assert results["machine"]["cpu_count"] >= 1
    table = (tmp_path / "data.md").read_text()
    assert "| image | 2 |" in table and "| video | 0 |" in table and "| coco | s3 |" in table

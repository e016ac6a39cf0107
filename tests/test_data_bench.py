"""``aurora-bench data`` end to end on a tiny generated set (starts its own SeaweedFS)."""

import json

import pytest

from aurora_ds.bench.cli import main

pytestmark = pytest.mark.s3


def test_bench_data_writes_json_and_table(tmp_path):
    rc = main(["data", "--out", str(tmp_path), "--images", "10", "--videos", "4", "--image-size", "32",
               "--num-frames", "2", "--per-shard", "3", "--workers", "2"])
    assert rc == 0
    results = json.loads((tmp_path / "data.json").read_text())
    rows = {(r["media"], r["source"], r["workers"]): r for r in results["read"]}
    assert set(rows) == {(m, s, w) for m in ("image", "video") for s in ("local", "s3") for w in (0, 2)}
    assert rows[("image", "local", 0)]["ratio"] == 1.0 and rows[("video", "local", 0)]["ratio"] == 1.0
    assert all(r["samples"] > 0 and r["samples_per_s"] > 0 for r in rows.values())
    assert rows[("image", "s3", 2)]["samples"] == rows[("image", "local", 0)]["samples"]
    assert {(w["dataset"], w["destination"]) for w in results["write"]} == {
        (d, s) for d in ("coco", "msrvtt") for s in ("local", "s3")}
    assert "| image | s3 | 2 |" in (tmp_path / "data.md").read_text()

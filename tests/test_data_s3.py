"""The loader against a real SeaweedFS S3 endpoint: 2 ranks x 2 workers, storage helpers, and
the endpoint stopped or frozen mid-epoch (readers run in subprocesses under an outer timeout)."""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from aurora_ds.data import SeaweedServer, pre_caption, storage

pytestmark = pytest.mark.s3

READER = r"""
import json, sys, time
from aurora_ds.data import LoaderConfig, build_loader
from aurora_ds.data.text import HashTokenizer

jobs, delay = json.loads(sys.argv[1]), float(sys.argv[2])
try:
    for spec, media, caption_per_sample in jobs:
        cfg = LoaderConfig(media=media, image_size=32, num_frames=4, batch_size=2, num_workers=2,
                           shuffle_buffer=10, caption_per_sample=caption_per_sample, seed=3)
        out = []
        for batch in build_loader(spec, cfg, HashTokenizer()):
            out += list(zip(batch["media_id"], batch["caption"]))
            print("BATCH", flush=True)
            time.sleep(delay)
        print("RESULT", json.dumps(out), flush=True)
except Exception as exn:
    print("ERROR", type(exn).__name__, exn, flush=True)
    sys.exit(3)
"""


def run_reader(jobs, env, delay=0.0):
    """A subprocess reading each (spec, media, caption_per_sample) job in train mode."""
    return subprocess.Popen([sys.executable, "-c", READER, json.dumps(jobs), str(delay)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def results_of(proc, timeout=120):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return [[tuple(p) for p in json.loads(line[len("RESULT "):])]
            for line in out.splitlines() if line.startswith("RESULT ")]


@pytest.mark.distributed
def test_two_ranks_two_workers_read_every_sample_once(s3_server, shard_factory):
    images = shard_factory.coco(16, prefix="img")
    videos = shard_factory.msrvtt(8)
    base = "s3://%s/dist" % s3_server.bucket
    image_spec = shard_factory.write(images, base + "/coco", "coco-train", per_shard=2)
    video_spec = shard_factory.write(videos, base + "/msrvtt", "msrvtt-train", per_shard=2, kind="video")

    procs = [run_reader([[image_spec, "image", "all"], [video_spec, "video", "random"]],
                        dict(os.environ, RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1"))
             for rank in range(2)]
    (image0, video0), (image1, video1) = [results_of(p) for p in procs]
    image_parts, video_parts = [image0, image1], [video0, video1]

    expected = Counter((s["json"]["id"], pre_caption(c)) for s in images for c in s["json"]["captions"])
    assert all(image_parts) and not set(image_parts[0]) & set(image_parts[1])
    assert Counter(image_parts[0] + image_parts[1]) == expected
    video_ids = [mid for part in video_parts for mid, _ in part]
    assert all(video_parts) and sorted(video_ids) == sorted(s["json"]["id"] for s in videos)


def test_storage_helpers_and_webdataset_s3(s3_server, tmp_path):
    import webdataset as wds

    url = "s3://%s/helpers/blob.bin" % s3_server.bucket
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(3000))
    storage.put_file(str(src), url)
    assert storage.exists(url) and storage.size(url) == 3000
    assert storage.read_bytes(url) == src.read_bytes()
    assert url in storage.list_urls("s3://%s/helpers" % s3_server.bucket)
    assert not storage.exists(url + ".missing")

    with wds.TarWriter(str(tmp_path / "t.tar")) as w:
        w.write({"__key__": "k0", "txt": b"hello"})
    storage.put_file(str(tmp_path / "t.tar"), "s3://%s/helpers/t.tar" % s3_server.bucket)
    ds = wds.WebDataset("s3://%s/helpers/t.tar" % s3_server.bucket, shardshuffle=False)
    assert [s["txt"] for s in ds] == [b"hello"]


@pytest.fixture
def fault_server(shard_factory):
    """A dedicated server (these tests freeze and kill it) holding 48 two-image shards: many more
    than the readers' shuffle buffers and prefetching hold, so reading goes on after the fault."""
    with SeaweedServer(stop_timeout=5) as server:
        bucket = server.create_bucket("aurora-faults")
        with server.environment():
            spec = shard_factory.write(shard_factory.coco(96, prefix="f"), "s3://%s/f" % bucket, "f", per_shard=2)
        yield server, spec, dict(os.environ, OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", **server.env())


def fail_mid_epoch(fault_server, action, delay):
    """Start a reader taking ``delay`` s per batch (48 batches), apply ``action`` to the server after
    its first batch; returns (seconds from the action to the reader's exit, exit code, output)."""
    server, spec, env = fault_server
    proc = run_reader([[spec, "image", "random"]], env, delay=delay)
    seen = ""
    while not seen.endswith("BATCH\n"):
        line = proc.stdout.readline()
        assert line, seen  # the reader ended before its first batch
        seen += line
    action(server)
    start = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=100)
    finally:
        proc.kill()
    return time.monotonic() - start, proc.returncode, seen + out


def test_frozen_endpoint_fails_naming_shard(fault_server):
    seconds, rc, out = fail_mid_epoch(fault_server, SeaweedServer.pause, delay=0.3)
    fault_server[0].resume()
    assert rc == 3, out
    assert re.search(r"ERROR ShardError cannot read shard s3://aurora-faults/f/f-\d{6}\.tar after 3 attempt", out), out
    assert seconds < 60, (seconds, out)


def test_stopped_endpoint_fails_naming_shard(fault_server):
    # slow enough that the reader cannot finish the epoch while weed shuts down gracefully (2-14 s)
    seconds, rc, out = fail_mid_epoch(fault_server, SeaweedServer.stop, delay=1.0)
    assert rc == 3, out
    assert re.search(r"ERROR ShardError cannot read shard s3://aurora-faults/f/f-\d{6}\.tar", out), out
    assert seconds < 60, (seconds, out)


@pytest.mark.timeout(120)
def test_s3_errors_name_url_bucket_and_endpoint(s3_server, monkeypatch):
    storage.write_bytes(f"s3://{s3_server.bucket}/err/x.tar", b"data")
    with pytest.raises(storage.S3Error, match=r"s3://no-such-bucket/x\.tar: bucket 'no-such-bucket' does not exist at http"):
        storage.read_bytes("s3://no-such-bucket/x.tar")
    with pytest.raises(FileNotFoundError, match=r"s3://%s/err/missing\.tar: no such object in bucket" % s3_server.bucket):
        storage.read_bytes(f"s3://{s3_server.bucket}/err/missing.tar")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.S3Error, match=r"s3://%s/err/x\.tar: access to bucket '%s' at .* is forbidden"
                       % (s3_server.bucket, s3_server.bucket)):
        storage.read_bytes(f"s3://{s3_server.bucket}/err/x.tar")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    with pytest.raises(storage.S3Error, match=r"s3://%s/err/x\.tar: cannot reach the S3 endpoint http://127\.0\.0\.1:%d"
                       % (s3_server.bucket, port)):
        storage.read_bytes(f"s3://{s3_server.bucket}/err/x.tar")


@pytest.mark.timeout(120)
def test_shard_specs_on_s3_are_checked_before_the_run(s3_server, monkeypatch):
    """validate_inputs: every object of an s3:// spec exists and is non-empty (one listing per
    folder); an unreachable endpoint is an error naming it, within its timeouts."""
    from aurora_ds.dist import free_port
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.inputs import validate_inputs

    base = f"s3://{s3_server.bucket}/inputs"
    for i in range(2):
        storage.write_bytes(f"{base}/s-{i}.tar", b"x" * 1024)
    storage.write_bytes(f"{base}/empty-0.tar", b"")

    def cfg(**shards):
        return build_config("", {"engine.deepspeed": False, "data.train_shards": f"{base}/s-{{0..1}}.tar", **shards})

    validate_inputs(cfg(**{"data.eval_shards": f"{base}/s-1.tar"}))
    with pytest.raises(FileNotFoundError, match=rf"data.eval_shards: 1 of the 3 shards under {base} do not exist, "
                                                rf"e.g. {base}/s-2\.tar"):
        validate_inputs(cfg(**{"data.eval_shards": f"{base}/s-{{0..2}}.tar"}))
    with pytest.raises(FileNotFoundError, match=rf"data.test_shards: 1 of the 1 shards under s3://{s3_server.bucket}/gone do not exist"):
        validate_inputs(cfg(**{"data.test_shards": f"s3://{s3_server.bucket}/gone/t-0.tar"}))
    with pytest.raises(ValueError, match=rf"data.test_shards: shard {base}/empty-0\.tar is empty"):
        validate_inputs(cfg(**{"data.test_shards": f"{base}/empty-0.tar"}))
    port = free_port()
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"data.train_shards: cannot list the shards under {base}: .*cannot reach "
                                         rf"the S3 endpoint http://127\.0\.0\.1:{port}"):
        validate_inputs(cfg())
    assert time.monotonic() - started < 60


@pytest.mark.timeout(300)
def test_resume_mid_epoch_is_exact_from_s3(s3_server, shard_factory, monkeypatch):
    """2 ranks x 2 workers reading shards from S3: stopped after any batch and resumed from the
    state, each rank continues with exactly the batches (ids, captions, pixels) it would have had."""
    from aurora_ds.data import LoaderConfig, build_loader
    from aurora_ds.data.text import HashTokenizer

    samples = shard_factory.coco(22, prefix="res")
    spec = shard_factory.write(samples, "s3://%s/resume" % s3_server.bucket, "res", per_shard=4)
    cfg = LoaderConfig(image_size=32, batch_size=3, num_workers=2, shuffle_buffer=5, seed=4)

    def stream(loader, stop=None):
        out = []
        for b in loader:
            out.append([(m, c, round(float(p.double().sum()), 4))
                        for m, c, p in zip(b["media_id"], b["caption"], b["pixel_values"])])
            if stop is not None and len(out) == stop:
                break
        return out

    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        full = stream(build_loader(spec, cfg, HashTokenizer()))
        seen.update(m for b in full for m, _, _ in b)
        for stop in (1, len(full) // 2 + 1):
            first = build_loader(spec, cfg, HashTokenizer())
            head = stream(first, stop)
            resumed = build_loader(spec, cfg, HashTokenizer())
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            assert head + stream(resumed) == full, (rank, stop)
    assert seen == Counter(s["json"]["id"] for s in samples)


@pytest.mark.timeout(180)
def test_a_rank_without_secrets_in_its_environment_reads_with_the_credentials_file(s3_server, shard_factory, tmp_path):
    """What a rank on another node sees: launchers forward no secrets, so it has no AWS_* keys in
    its environment (nor on its command line) and reads with the shared credentials file."""
    images = shard_factory.coco(4, prefix="cred")
    spec = shard_factory.write(images, "s3://%s/cred" % s3_server.bucket, "coco-train", per_shard=2)
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                     % (s3_server.access_key, s3_server.secret_key))
    creds.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(creds), AWS_CONFIG_FILE=str(tmp_path / "none"), OMP_NUM_THREADS="1")
    proc = run_reader([[spec, "image", "all"]], env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert s3_server.secret_key not in out and s3_server.secret_key not in " ".join(proc.args)
    delivered = [json.loads(line[len("RESULT "):]) for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(delivered) == 1 and {mid for mid, _ in delivered[0]} == {s["json"]["id"] for s in images}
    # And explicitly anonymous access is refused by a server that wants credentials, naming the bucket.
    env["AURORA_S3_ANONYMOUS"] = "1"
    proc = run_reader([[spec, "image", "all"]], env)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and s3_server.bucket in out


def test_a_forked_process_reads_with_a_client_of_its_own(s3_server):
    """A process forked after its parent has read keeps none of the parent's connections: it
    builds its own client and reads through it; the parent keeps reading with its own."""
    url = f"s3://{s3_server.bucket}/fork/blob.bin"
    storage.write_bytes(url, b"x" * 5000)
    assert storage.read_bytes(url) == b"x" * 5000
    parent = storage.s3_client()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the answer goes through the pipe, whatever happens
        try:
            child = storage.s3_client()
            ok = child is not parent and storage.read_bytes(url) == b"x" * 5000
            os.write(write, b"ok" if ok else b"wrong client")
        except BaseException as exn:  # noqa: BLE001
            os.write(write, repr(exn).encode()[:500])
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 1000)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"ok"
    assert storage.s3_client() is parent and storage.read_bytes(url) == b"x" * 5000

"""shard_tools against a real SeaweedFS S3 server: same bytes as local output, verify, resume, multipart."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from aurora_ds.data import storage
from shard_tools import convert as convert_mod
from shard_tools import sample
from shard_tools.cli import main

pytestmark = pytest.mark.s3


def convert(anns, media_root, out, *extra):
    args = ["convert", "coco", "--media-root", media_root, "--split", "train", "--out", out, *extra]
    for ann in anns:
        args += ["--ann", ann]
    return main(args)


def local_files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def s3_files(prefix):
    return {url.rsplit("/", 1)[1]: storage.read_bytes(url) for url in storage.list_urls(prefix)}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    sample.make_coco(root, 12, seed=5)
    return root, [os.path.join(root, "annotations", "coco_karpathy_train.json")]


def test_s3_output_matches_local_and_verifies(s3_server, tmp_path, coco, capsys):
    root, anns = coco
    prefix = f"s3://{s3_server.bucket}/shards/coco-train"
    assert convert(anns, root, prefix, "--maxcount", "3") == 0
    assert convert(anns, root, str(tmp_path), "--maxcount", "3") == 0
    remote = s3_files(prefix)
    assert remote == local_files(str(tmp_path))
    assert "manifest.partial.json" not in remote and len(remote) == 2 + 3

    capsys.readouterr()
    assert main(["verify", prefix]) == 0
    assert "OK: 3 shard(s), 8 samples (8 images" in capsys.readouterr().out
    spec = prefix + "/coco-train-{000000..000003}.tar"
    assert main(["verify", spec]) == 1
    assert f"MISSING {prefix}/coco-train-000003.tar" in capsys.readouterr().out


def test_s3_resume(s3_server, tmp_path, coco, monkeypatch, capsys):
    root, anns = coco
    prefix = f"s3://{s3_server.bucket}/shards/resume"
    real, uploads = storage.put_file, []

    def failing_put(local, url):
        if len(uploads) == 1:
            raise OSError("connection reset (simulated)")
        uploads.append(url)
        real(local, url)

    monkeypatch.setattr(convert_mod.storage, "put_file", failing_put)
    assert convert(anns, root, prefix, "--maxcount", "2") == 1  # a one-line error, not a traceback
    err = capsys.readouterr().err
    assert "aurora-shard convert: error: OSError: connection reset (simulated)" in err and "Traceback" not in err
    assert sorted(s3_files(prefix)) == ["coco-train-000000.tar", "manifest.partial.json"]

    monkeypatch.setattr(convert_mod.storage, "put_file", real)
    capsys.readouterr()
    assert convert(anns, root, prefix, "--maxcount", "2") == 0
    assert "resuming: 1 complete shard(s) kept" in capsys.readouterr().err
    assert convert(anns, root, str(tmp_path), "--maxcount", "2") == 0
    assert s3_files(prefix) == local_files(str(tmp_path))


def test_s3_multipart_upload_of_a_large_shard(s3_server, tmp_path, monkeypatch):
    """A shard several upload chunks large goes up in parts and comes back byte-identical."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8))
    os.makedirs(tmp_path / "media")
    noise.save(tmp_path / "media" / "COCO_val2014_000000000001.png", compress_level=1)
    ann = tmp_path / "coco_karpathy_val.json"
    ann.write_text('[{"image": "COCO_val2014_000000000001.png", "caption": ["Colour noise."]}]')
    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 5 * 2**20)

    prefix = f"s3://{s3_server.bucket}/shards/large"
    assert convert([str(ann)], str(tmp_path / "media"), prefix) == 0
    assert convert([str(ann)], str(tmp_path / "media"), str(tmp_path / "local")) == 0
    name = "coco-train-000000.tar"
    local = open(tmp_path / "local" / name, "rb").read()
    assert len(local) > 2 * 5 * 2**20  # s3fs uploads in one PUT below two chunks
    assert storage.read_bytes(f"{prefix}/{name}") == local
    etag = storage.s3_filesystem().info(f"{s3_server.bucket}/shards/large/{name}")["ETag"]
    assert etag.strip('"').endswith("-3")  # the ETag of a 3-part multipart upload
    assert main(["verify", prefix]) == 0


def test_vqa_answer_list_from_s3(s3_server, tmp_path):
    """A QA split converted to s3:// carries its answers.json (same bytes as local), and the run's
    answer list is built from it without reading a shard."""
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.data import answer_list
    from aurora_ds.engine.rundir import RunDir

    raw = sample.make_vqa(str(tmp_path / "raw"), 6, seed=1, subtypes=("train2014",))
    anns = ["--ann", f"{raw}/v2_OpenEnded_mscoco_train2014_questions.json", "--ann", f"{raw}/v2_mscoco_train2014_annotations.json"]
    prefix = f"s3://{s3_server.bucket}/shards/vqa-train"
    for out in (prefix, str(tmp_path / "local")):
        assert main(["convert", "vqa", *anns, "--media-root", raw, "--split", "train", "--out", out, "--maxcount", "3"]) == 0
    assert s3_files(prefix) == local_files(str(tmp_path / "local"))
    for url in storage.list_urls(prefix):
        if url.endswith(".tar"):
            storage.s3_filesystem().rm_file(url[len("s3://"):])
    cfg = build_config("", {"objective.task": "qa", "data.train_shards": prefix + "/vqa-train-{000000..000001}.tar"})
    answers = answer_list(cfg, RunDir(tmp_path / "run"))
    counts = storage.read_bytes(prefix + "/answers.json")
    assert answers == list(json.loads(counts)) and len(answers) > 1

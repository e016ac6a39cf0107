"""shard_tools: sample data -> convert -> verify on real JPEG/MP4 bytes, faults, corruption, resume."""

import collections
import io
import json
import os
import subprocess
import sys
import tarfile

import decord
import pytest
import webdataset as wds
from PIL import Image

from aurora_ds.data.shard_format import ANSWERS, MANIFEST, SIZES
from shard_tools import convert as convert_mod
from shard_tools import sample
from shard_tools.cli import main
from shard_tools.sample import COLORS, draw_scene, random_scene, scene_captions

N = 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """One small sample of every dataset, generated once."""
    root = tmp_path_factory.mktemp("samples")
    return {name: make(str(root / name), N, seed=3) for name, make in sample.MAKERS.items()}


def convert(dataset, anns, media_root, split, out, *extra):
    args = ["convert", dataset, "--media-root", media_root, "--split", split, "--out", str(out), *extra]
    for ann in anns:
        args += ["--ann", ann]
    return main(args)


def read_samples(folder):
    """Samples as the loader sees them: webdataset over the shards listed in sizes.json."""
    sizes = json.load(open(os.path.join(folder, SIZES)))
    urls = [os.path.join(folder, name) for name in sizes]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    for s in samples:
        s["meta"] = json.loads(s["json"])
    return sizes, samples


def load(path):
    return json.load(open(path, encoding="utf-8"))


def files_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_sample_is_deterministic_and_decodes(tmp_path, data):
    a = sample.make_msrvtt(str(tmp_path / "a"), 4, seed=3)
    b = sample.make_msrvtt(str(tmp_path / "b"), 4, seed=3)
    c = sample.make_msrvtt(str(tmp_path / "c"), 4, seed=4)
    video = os.path.join("videos", "all", "video0.mp4")
    assert files_bytes(os.path.join(a, "annotations")) == files_bytes(os.path.join(b, "annotations"))
    assert open(os.path.join(a, video), "rb").read() == open(os.path.join(b, video), "rb").read()
    assert files_bytes(os.path.join(a, "annotations")) != files_bytes(os.path.join(c, "annotations"))
    reader = decord.VideoReader(io.BytesIO(open(os.path.join(a, video), "rb").read()), ctx=decord.cpu(0), num_threads=1)
    assert len(reader) == sample.VIDEO_FRAMES and reader[0].shape == (sample.VIDEO_SIZE, sample.VIDEO_SIZE, 3)
    images = os.listdir(os.path.join(data["coco"], "val2014"))
    with Image.open(os.path.join(data["coco"], "val2014", images[0])) as img:
        assert img.format == "JPEG" and img.size == (sample.IMAGE_SIZE, sample.IMAGE_SIZE)


def test_captions_describe_the_pixels():
    import random

    rng = random.Random(0)
    checked = 0
    for _ in range(40):
        scene = random_scene(rng)
        if len(scene["objects"]) != 1:
            continue
        color = scene["objects"][0]["color"]
        centre = draw_scene(scene).getpixel((sample.IMAGE_SIZE // 2, sample.IMAGE_SIZE // 2))
        assert centre == COLORS[color]
        captions = scene_captions(scene, rng)
        shape = scene["objects"][0]["shape"]
        assert len(set(captions)) == 5 and all(color in c and shape in c for c in captions)
        checked += 1
    assert checked > 5


def expected_retrieval(dataset, d):
    """(anns, media_root, split, Counter of (file, caption)) computed straight from the sample files."""
    if dataset == "coco":
        anns = [os.path.join(d, "annotations", "coco_karpathy_train.json")]
        return anns, d, "train", collections.Counter((e["image"], e["caption"]) for e in load(anns[0]))
    if dataset == "flickr":
        anns = [os.path.join(d, "annotations", "dataset_flickr30k.json")]
        want = collections.Counter((i["filename"], s["raw"]) for i in load(anns[0])["images"]
                                   if i["split"] == "test" for s in i["sentences"])
        return anns, os.path.join(d, "flickr30k-images"), "test", want
    if dataset == "msrvtt":
        anns = [os.path.join(d, "annotations", "MSRVTT_data.json")]
        doc = load(anns[0])
        train = {v["video_id"] for v in doc["videos"] if v["split"] == "train"}
        want = collections.Counter((s["video_id"] + ".mp4", s["caption"]) for s in doc["sentences"]
                                   if s["video_id"] in train)
        return anns, os.path.join(d, "videos", "all"), "train", want
    anns = [os.path.join(d, "annotations", "train_data.json")]
    want = collections.Counter((os.path.splitext(e["video"])[0] + ".mp4", e["description"]) for e in load(anns[0]))
    return anns, os.path.join(d, "videos"), "train", want


@pytest.mark.parametrize("dataset", ["coco", "flickr", "msrvtt", "didemo"])
def test_retrieval_roundtrip(tmp_path, data, dataset, capsys):
    anns, media_root, split, want = expected_retrieval(dataset, data[dataset])
    assert convert(dataset, anns, media_root, split, tmp_path, "--maxcount", "2", "--strict") == 0
    assert main(["verify", str(tmp_path)]) == 0
    assert "OK:" in capsys.readouterr().out
    sizes, samples = read_samples(str(tmp_path))
    manifest = load(tmp_path / MANIFEST)
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == manifest["num_samples"] == sum(sizes.values())
    assert all(k.startswith(dataset + "_") and "." not in k for k in keys)
    assert {n: e["count"] for n, e in manifest["shards"].items()} == sizes
    assert list(sizes.values()) == [2] * (len(keys) // 2) + [1] * (len(keys) % 2)
    assert manifest["kind"] == ("image" if dataset in ("coco", "flickr") else "video")
    text_field = "sentences" if dataset == "didemo" else "captions"
    got = collections.Counter((s["meta"]["file"], c) for s in samples for c in s["meta"][text_field])
    assert got == want
    media_ext = "jpg" if manifest["kind"] == "image" else "mp4"
    for s in samples:
        assert s[media_ext] == open(os.path.join(media_root, s["meta"]["file"]), "rb").read()
    if dataset == "didemo":
        assert all(s["meta"]["captions"] == [" ".join(s["meta"]["sentences"])] for s in samples)
    # each shard's captions are counted in the manifest: steps per epoch of one pair per caption
    per_shard = collections.Counter()
    for s in samples:
        per_shard[s["__url__"].rsplit("/", 1)[-1]] += len(s["meta"]["captions"])
    assert {n: e["captions"] for n, e in manifest["shards"].items()} == per_shard
    assert not (tmp_path / ANSWERS).exists()


def test_coco_key_and_other_formats(tmp_path, data):
    """Karpathy's dataset_coco.json (restval is train) and BLIP's val file give the documented keys."""
    d = data["coco"]
    karpathy = load(os.path.join(d, "annotations", "dataset_coco.json"))["images"]
    assert convert("coco", [os.path.join(d, "annotations", "dataset_coco.json")], d, "train", tmp_path / "k") == 0
    _, samples = read_samples(str(tmp_path / "k"))
    train = [i for i in karpathy if i["split"] in ("train", "restval")]
    assert any(i["split"] == "restval" for i in train)
    assert sorted(s["__key__"] for s in samples) == sorted(f"coco_{i['cocoid']:012d}" for i in train)
    assert all(s["meta"]["id"] == str(int(s["__key__"][5:])) for s in samples)
    assert convert("coco", [os.path.join(d, "annotations", "coco_karpathy_val.json")], d, "val", tmp_path / "v") == 0
    _, samples = read_samples(str(tmp_path / "v"))
    want = {e["image"]: e["caption"] for e in load(os.path.join(d, "annotations", "coco_karpathy_val.json"))}
    assert {s["meta"]["file"]: s["meta"]["captions"] for s in samples} == want


def test_msrvtt_test_csv_and_jsonl(tmp_path, data):
    d = data["msrvtt"]
    ann = os.path.join(d, "annotations")
    videos = os.path.join(d, "videos", "all")
    assert convert("msrvtt", [os.path.join(ann, "MSRVTT_JSFUSION_test.csv")], videos, "test", tmp_path / "t") == 0
    _, samples = read_samples(str(tmp_path / "t"))
    test_ids = [v["video_id"] for v in load(os.path.join(ann, "MSRVTT_data.json"))["videos"] if v["split"] == "test"]
    assert [s["meta"]["id"] for s in samples] == test_ids and all(len(s["meta"]["captions"]) == 1 for s in samples)
    assert convert("msrvtt", [os.path.join(ann, "train.jsonl")], videos, "train9k", tmp_path / "j") == 0
    _, samples = read_samples(str(tmp_path / "j"))
    lines = [json.loads(x) for x in open(os.path.join(ann, "train.jsonl"))]
    got = collections.Counter((s["meta"]["id"], c) for s in samples for c in s["meta"]["captions"])
    assert got == collections.Counter((x["clip_name"], x["caption"]) for x in lines)


def test_qa_roundtrip(tmp_path, data, capsys):
    d = data["vqa"]
    anns = [os.path.join(d, "v2_OpenEnded_mscoco_val2014_questions.json"), os.path.join(d, "v2_mscoco_val2014_annotations.json")]
    assert convert("vqa", anns, d, "val", tmp_path / "vqa", "--maxcount", "2", "--strict") == 0
    assert main(["verify", str(tmp_path / "vqa")]) == 0
    sizes, samples = read_samples(str(tmp_path / "vqa"))
    assert len(samples) == sum(sizes.values()) == len({s["__key__"] for s in samples})
    questions = {q["question_id"]: q for q in load(anns[0])["questions"]}
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in load(anns[1])["annotations"]}
    got = {q["question_id"]: (s["meta"]["file"], q["question"], q["answers"], q["answer_counts"])
           for s in samples for q in s["meta"]["questions"]}
    assert got == {qid: (f"val2014/COCO_val2014_{q['image_id']:012d}.jpg", q["question"], answers[qid],
                         dict(collections.Counter(answers[qid]))) for qid, q in questions.items()}
    assert all(s["__key__"] == f"vqa_{int(s['meta']['id']):012d}" for s in samples)
    manifest = load(tmp_path / "vqa" / MANIFEST)
    assert sum(e["questions"] for e in manifest["shards"].values()) == len(questions)
    # the answer counts of the annotations, most frequent first: what the VQA answer list is built from
    counted = load(tmp_path / "vqa" / ANSWERS)
    assert counted == collections.Counter(a for human in answers.values() for a in human)
    assert list(counted.values()) == sorted(counted.values(), reverse=True)

    d = data["msrvtt_qa"]
    ann = os.path.join(d, "train_qa.json")
    assert convert("msrvtt_qa", [ann], os.path.join(d, "videos", "all"), "train", tmp_path / "mq", "--strict") == 0
    assert main(["verify", str(tmp_path / "mq")]) == 0
    _, samples = read_samples(str(tmp_path / "mq"))
    got = {q["question_id"]: (s["meta"]["id"], q["question"], q["answers"]) for s in samples for q in s["meta"]["questions"]}
    assert got == {e["id"]: (f"video{e['video_id']}", e["question"], [e["answer"]]) for e in load(ann)}
    assert load(tmp_path / "mq" / MANIFEST)["kind"] == "video_qa"


def test_vqa_test_dev_questions_without_annotations(tmp_path):
    """VQAv2 test-dev is released as a questions file alone (images in test2015): it converts with
    --strict, verifies, and every question is kept with no answers (and answers.json is empty)."""
    d = sample.make_vqa(str(tmp_path / "raw"), 6, seed=2, subtypes=("train2014", "test-dev2015"))
    assert not os.path.exists(os.path.join(d, "v2_mscoco_test-dev2015_annotations.json"))
    ann = os.path.join(d, "v2_OpenEnded_mscoco_test-dev2015_questions.json")
    assert convert("vqa", [ann], d, "test-dev", tmp_path / "td", "--strict") == 0
    assert main(["verify", str(tmp_path / "td")]) == 0
    _, samples = read_samples(str(tmp_path / "td"))
    got = {q["question_id"]: (s["meta"]["file"], q["answers"]) for s in samples for q in s["meta"]["questions"]}
    assert got == {q["question_id"]: (f"test2015/COCO_test2015_{q['image_id']:012d}.jpg", []) for q in load(ann)["questions"]}
    assert load(tmp_path / "td" / ANSWERS) == {}


def test_output_independent_of_workers_and_resize(tmp_path, data):
    d = data["msrvtt"]
    anns = [os.path.join(d, "annotations", "MSRVTT_data.json")]
    videos = os.path.join(d, "videos", "all")
    assert convert("msrvtt", anns, videos, "train", tmp_path / "w1", "--maxcount", "2") == 0
    assert convert("msrvtt", anns, videos, "train", tmp_path / "w2", "--maxcount", "2", "--workers", "2") == 0
    assert files_bytes(tmp_path / "w1") == files_bytes(tmp_path / "w2")
    assert convert("msrvtt", anns, videos, "train", tmp_path / "r", "--resize", "64") == 0
    assert main(["verify", str(tmp_path / "r")]) == 0
    _, samples = read_samples(str(tmp_path / "r"))
    frame = decord.VideoReader(io.BytesIO(samples[0]["mp4"]), ctx=decord.cpu(0), num_threads=1)[0]
    assert frame.shape == (64, 64, 3)


def test_maxsize_splits_shards(tmp_path, data):
    d = data["coco"]
    ann = os.path.join(d, "annotations", "coco_karpathy_train.json")
    assert convert("coco", [ann], d, "train", tmp_path, "--maxsize", "4000") == 0
    manifest = load(tmp_path / MANIFEST)
    _, samples = read_samples(str(tmp_path))
    payload = {s["__key__"]: len(s["jpg"]) + len(s["json"]) for s in samples}
    assert len(manifest["shards"]) > 1 and manifest["num_samples"] == len(samples)
    start = 0
    for entry in manifest["shards"].values():
        sizes = list(payload.values())[start:start + entry["count"]]
        assert sum(sizes) <= 4000 or entry["count"] == 1
        start += entry["count"]


def rewrite_member(shard, suffix, change):
    """Rewrite a shard with the first member ending in `suffix` replaced by change(bytes)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    target = next(m.name for m, _ in members if m.name.endswith(suffix))
    with tarfile.open(shard, "w") as tar:
        for m, payload in members:
            payload = change(payload) if m.name == target else payload
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    return target.split(".")[0]


def test_verify_catches_damage(tmp_path, data, capsys):
    d = data["coco"]
    ann = os.path.join(d, "annotations", "coco_karpathy_train.json")
    out = tmp_path / "coco"
    assert convert("coco", [ann], d, "train", out, "--maxcount", "2") == 0
    names = sorted(load(out / MANIFEST)["shards"])
    capsys.readouterr()

    key = rewrite_member(out / names[0], ".jpg", lambda b: b[: len(b) // 2])
    os.truncate(out / names[1], 1500)
    os.remove(out / names[2])
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"CORRUPT {out}/{names[0]} sample {key}: jpg" in report
    assert f"TRUNCATED {out}/{names[1]}" in report
    assert f"MISSING {out}/{names[2]}" in report
    assert "FAILED" in report
    pattern = f"{out}/coco-train-{{000000..{len(names):06d}}}.tar"
    assert main(["verify", pattern]) == 1
    assert f"MISSING {out}/coco-train-{len(names):06d}.tar" in capsys.readouterr().out

    d = data["msrvtt"]
    out = tmp_path / "msrvtt"
    assert convert("msrvtt", [os.path.join(d, "annotations", "MSRVTT_data.json")], os.path.join(d, "videos", "all"),
                   "train", out, "--maxcount", "2") == 0
    manifest = load(out / MANIFEST)
    first, name = sorted(manifest["shards"])[0], sorted(manifest["shards"])[-1]
    key = rewrite_member(out / name, ".mp4", lambda b: b[:200] + bytes(len(b) - 200))
    captions = manifest["shards"][first]["captions"]
    manifest["shards"][first]["captions"] += 1  # a manifest that miscounts the pairs of an epoch
    write_bytes(out / MANIFEST, json.dumps(manifest).encode())
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"CORRUPT {out}/{name} sample {key}: mp4" in report
    assert f"CHECKSUM {out}/{name}" in report
    assert f"COUNT {out}/{first}: {captions} captions, manifest says {captions + 1}" in report


def test_verify_reports_a_member_the_loader_would_not_read(tmp_path, data, capsys, monkeypatch):
    """A member over the loader's default max_member_mb is a problem for verify too: the loader
    skips its sample unread."""
    from aurora_ds.data import shard_format

    d = data["coco"]
    out = tmp_path / "coco"
    assert convert("coco", [os.path.join(d, "annotations", "coco_karpathy_train.json")], d, "train", out) == 0
    name = sorted(load(out / MANIFEST)["shards"])[0]
    key = rewrite_member(out / name, ".jpg", lambda b: b + bytes(20000))
    monkeypatch.setattr(shard_format, "MAX_MEMBER_MB", 0.01)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"CORRUPT {out}/{name} sample {key}: jpg: " in report
    assert "bytes, over the loader's default max_member_mb=0.01 (data.max_member_mb)" in report


def write_bytes(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_faults_reported_and_strict(tmp_path, data, capsys):
    d = data["coco"]
    good = load(os.path.join(d, "annotations", "coco_karpathy_val.json"))
    good += load(os.path.join(d, "annotations", "coco_karpathy_test.json"))
    assert len(good) >= 4
    write_bytes(os.path.join(d, "val2014", "COCO_val2014_000000777777.jpg"), b"not a jpeg at all")
    entries = [
        good[0],
        {"image": "val2014/COCO_val2014_000000999999.jpg", "caption": ["A missing picture."]},
        dict(good[0]),
        {"image": good[1]["image"], "caption": good[1]["caption"][:4] + ["   "]},
        {"image": good[2]["image"], "caption": good[2]["caption"][:4] + ["@@BAD@@"]},
        {"image": "val2014/COCO_val2014_000000777777.jpg", "caption": ["A broken picture."]},
    ]
    blip = str(tmp_path / "broken_val.json")
    write_bytes(blip, json.dumps(entries).encode().replace(b"@@BAD@@", b"caf\xe9 au lait"))
    official = str(tmp_path / "captions_val2014.json")
    image_id = int(good[3]["image"][-16:-4])
    write_bytes(official, json.dumps({
        "images": [{"id": image_id, "file_name": good[3]["image"]}],
        "annotations": [{"image_id": image_id, "id": 1, "caption": "Fine."},
                        {"image_id": 424242, "id": 2, "caption": "A caption for nothing."}],
    }).encode())

    out = tmp_path / "out"
    assert convert("coco", [blip, official], d, "val", out) == 0
    err = capsys.readouterr().err
    manifest = load(out / MANIFEST)
    assert manifest["faults"] == {"missing_media": 1, "unreadable_media": 1, "duplicate_id": 1,
                                  "empty_text": 1, "non_utf8_text": 1, "unknown_media": 1}
    for needle in ("fault missing_media: 1", "999999", "fault unknown_media: 1", "424242",
                   "fault non_utf8_text: 1", "caf\\\\xe9", "fault duplicate_id: 1", "fault unreadable_media: 1",
                   "777777", "fault empty_text: 1"):
        assert needle in err, needle
    _, samples = read_samples(str(out))
    captions = {s["meta"]["file"]: s["meta"]["captions"] for s in samples}
    assert captions == {good[0]["image"]: good[0]["caption"], good[1]["image"]: good[1]["caption"][:4],
                        good[2]["image"]: good[2]["caption"][:4], good[3]["image"]: ["Fine."]}

    strict_out = tmp_path / "strict"
    assert convert("coco", [blip, official], d, "val", strict_out, "--strict") == 1
    assert "nothing written" in capsys.readouterr().err and not strict_out.exists()

    only_media = str(tmp_path / "only_media.json")
    write_bytes(only_media, json.dumps([good[0], entries[5]]).encode())
    assert convert("coco", [only_media], d, "val", strict_out, "--strict") == 1
    assert "fault unreadable_media: 1" in capsys.readouterr().err and not strict_out.exists()


REAL_PUT_FILE = convert_mod.storage.put_file


class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, n):
    """Make the n+1-th shard upload fail, as a killed run would leave things."""
    calls = []
    real = REAL_PUT_FILE

    def put_file(local, url):
        if len(calls) == n:
            raise Interrupted(url)
        calls.append(url)
        real(local, url)

    monkeypatch.setattr(convert_mod.storage, "put_file", put_file)
    return calls


def test_resume_skips_complete_shards(tmp_path, data, monkeypatch, capsys):
    d = data["coco"]
    entries = load(os.path.join(d, "annotations", "coco_karpathy_train.json"))
    entries.insert(1, {"image": "train2014/COCO_train2014_000000888888.jpg", "caption": "Gone.", "image_id": "x"})
    ann = str(tmp_path / "train.json")
    write_bytes(ann, json.dumps(entries).encode())
    args = ("--maxcount", "1")
    assert convert("coco", [ann], d, "train", tmp_path / "ref", *args) == 0

    out = tmp_path / "out"
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Interrupted):
        convert("coco", [ann], d, "train", out, *args)
    partial = load(out / "manifest.partial.json")
    assert [e["name"] for e in partial["shards"]] == [f"coco-train-{i:06d}.tar" for i in range(3)]
    assert not (out / MANIFEST).exists()
    kept = {n: os.stat(out / n).st_mtime_ns for n in ("coco-train-000000.tar", "coco-train-000001.tar")}
    with open(out / "coco-train-000002.tar", "ab") as f:
        f.write(b"damage")
    capsys.readouterr()

    calls = interrupt_after(monkeypatch, 100)
    assert convert("coco", [ann], d, "train", out, *args) == 0
    assert "resuming: 2 complete shard(s) kept" in capsys.readouterr().err
    assert {n: os.stat(out / n).st_mtime_ns for n in kept} == kept
    assert [os.path.basename(c) for c in calls] == [f"coco-train-{i:06d}.tar" for i in range(2, 6)]
    assert files_bytes(out) == files_bytes(tmp_path / "ref")
    assert load(out / MANIFEST)["faults"] == {"missing_media": 1}


def test_cli_end_to_end(tmp_path):
    """The installed command path: sample -> convert (2 spawned workers, two annotation files) -> verify."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "shard_tools.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)

    d = str(tmp_path / "msrvtt_qa")
    assert run("sample", "msrvtt_qa", "--out", d, "--n", "6", "--seed", "1").returncode == 0
    out = str(tmp_path / "shards")
    done = run("convert", "msrvtt_qa", "--ann", os.path.join(d, "train_qa.json"), "--ann", os.path.join(d, "val_qa.json"),
               "--media-root", os.path.join(d, "videos", "all"), "--split", "trainval", "--out", out,
               "--workers", "2", "--maxcount", "2", "--strict")
    assert done.returncode == 0, done.stderr
    entries = load(os.path.join(d, "train_qa.json")) + load(os.path.join(d, "val_qa.json"))
    manifest = load(os.path.join(out, MANIFEST))
    assert manifest["num_samples"] == len({e["video_id"] for e in entries}) and manifest["faults"] == {}
    checked = run("verify", out + "/msrvtt_qa-trainval-{000000..000002}.tar")
    assert checked.returncode == 0 and checked.stdout.startswith("OK: 3 shard(s), 5 samples (0 images, 5 videos)")


def test_cli_reports_missing_annotation(tmp_path, capsys):
    assert convert("coco", [str(tmp_path / "nope.json")], str(tmp_path), "val", tmp_path / "out") == 1
    assert "nope.json" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bmp_and_gif_are_reencoded_and_train(tmp_path, capsys):
    """Images in formats the loader does not read (BMP, GIF) are stored as lossless PNG and counted,
    so they load and decode (they used to convert and then be skipped as missing_field); a format
    nobody reads is a fault naming the file."""
    import numpy as np

    from aurora_ds.data import LoaderConfig, build_loader
    from aurora_ds.data.media import decode_image

    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for name in ("a", "b", "c")}
    os.makedirs(tmp_path / "raw")
    Image.fromarray(pixels["a"]).save(tmp_path / "raw" / "a.bmp")
    gif = Image.fromarray(pixels["b"]).convert("P")  # GIF is palette-based: what PIL decodes is the truth
    gif.save(tmp_path / "raw" / "b.gif")
    pixels["b"] = np.asarray(Image.open(tmp_path / "raw" / "b.gif").convert("RGB"))
    Image.fromarray(pixels["c"]).save(tmp_path / "raw" / "c.png")
    Image.fromarray(pixels["c"]).save(tmp_path / "raw" / "d.tiff")
    entries = [{"image": f"{n}.{e}", "caption": [f"Picture {n}."]} for n, e in (("a", "bmp"), ("b", "gif"), ("c", "png"))]
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps(entries))
    out = tmp_path / "shards"
    assert convert("flickr", [str(ann)], str(tmp_path / "raw"), "test", out, "--strict") == 0
    assert "re-encoded 2 image(s) as png (bmp: 1, gif: 1)" in capsys.readouterr().err
    assert main(["verify", str(out)]) == 0
    manifest = load(out / MANIFEST)
    assert manifest["reencoded"] == {"bmp": 1, "gif": 1} and manifest["num_samples"] == 3
    _, samples = read_samples(str(out))
    assert {s["__key__"]: s["meta"]["file"] for s in samples if "png" in s} == {
        "flickr_a": "a.bmp", "flickr_b": "b.gif", "flickr_c": "c.png"}
    for s in samples:
        assert (decode_image(s["png"]).permute(1, 2, 0).numpy() == pixels[s["meta"]["id"]]).all()

    spec = f"{out}/flickr-test-000000.tar"
    loader = build_loader(spec, LoaderConfig(image_size=16, batch_size=8, num_workers=0), mode="eval")
    batches = list(loader)
    assert loader.faults() == {} and sorted(batches[0]["media_id"]) == ["a", "b", "c"]
    assert batches[0]["pixel_values"].shape == (3, 3, 16, 16)

    entries.append({"image": "d.tiff", "caption": ["Picture d."]})
    ann.write_text(json.dumps(entries))
    assert convert("flickr", [str(ann)], str(tmp_path / "raw"), "test", tmp_path / "tiff") == 0
    err = capsys.readouterr().err
    assert "fault unreadable_media: 1" in err and "d.tiff" in err and "unsupported media extension 'tiff'" in err


def test_duplicate_entries_dropped_counted_and_manifest_reproducible(tmp_path, data, capsys):
    d = data["coco"]
    good = load(os.path.join(d, "annotations", "coco_karpathy_val.json"))
    write_bytes(os.path.join(d, "val2014", "COCO_val2014_000000888888.jpg"), b"not an image")
    one_per_caption = [{"image": good[0]["image"], "caption": "The same words."},
                       {"image": good[0]["image"], "caption": "The same words."},
                       {"image": good[0]["image"], "caption": "Other words."},
                       {"image": "val2014/COCO_val2014_000000888888.jpg", "caption": "Broken."}]
    ann = str(tmp_path / "train.json")
    write_bytes(ann, json.dumps(one_per_caption).encode())
    manifests = []
    for name in ("a", "b"):
        assert convert("coco", [ann], d, "val", tmp_path / name) == 0
        manifests.append((tmp_path / name / MANIFEST).read_text())
    assert "fault duplicate_entry: 1" in capsys.readouterr().err
    manifest = json.loads(manifests[0])
    assert manifest["faults"]["duplicate_entry"] == 1
    assert " at 0x" not in manifests[0] and manifests[0] == manifests[1]
    _, samples = read_samples(str(tmp_path / "a"))
    assert [s["meta"]["captions"] for s in samples] == [["The same words.", "Other words."]]


def test_cli_failures_are_one_line(tmp_path, data, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert convert("coco", [str(bad)], data["coco"], "val", tmp_path / "out") == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "bad.json is not valid JSON" in err

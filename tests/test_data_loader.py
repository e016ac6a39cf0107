"""The shard loader on local files: contents, splitting, determinism, resume, faults, quoting."""

import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
from collections import Counter

import pytest
import torch

from aurora_ds.data import (DataShortfallError, EmptyEpochError, LoaderConfig, ShardError, build_loader, expand_urls,
                            pre_caption, pre_question, read_manifest)
from aurora_ds.data.media import frame_indices
from aurora_ds.data.shard_format import MANIFEST
from aurora_ds.data.storage import curl_command


def cfg(**kw):
    base = dict(image_size=32, batch_size=4, num_workers=2, shuffle_buffer=20, num_frames=4, seed=1)
    base.update(kw)
    return LoaderConfig(**base)


@pytest.fixture(scope="module")
def coco(tmp_path_factory, shard_factory):
    out = str(tmp_path_factory.mktemp("coco"))
    samples = shard_factory.coco(24)
    return shard_factory.write(samples, out, "coco-train", per_shard=6), samples


def all_pairs(samples):
    return Counter((s["json"]["id"], pre_caption(c)) for s in samples for c in s["json"]["captions"])


def test_expand_urls_and_manifest(coco):
    spec, samples = coco
    urls = expand_urls(spec)
    assert [os.path.basename(u) for u in urls] == ["coco-train-%06d.tar" % i for i in range(4)]
    assert expand_urls("a-{0..1}.tar::b-{00..02}.tar") == ["a-0.tar", "a-1.tar", "b-00.tar", "b-01.tar", "b-02.tar"]
    m = read_manifest(spec)
    assert m["kind"] == "image" and m["num_samples"] == 24 and set(m["counts"]) == set(urls)
    assert read_manifest(urls[0].replace("coco-train-000000", "other")) is None
    with pytest.raises(ValueError):
        expand_urls(" :: ")


def test_text_cleaning_matches_blip():
    assert pre_caption("  A man (left) riding a horse!!  On the beach.  ") == "a man left riding a horse on the beach"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_question("What's the man holding?") == "what's the man holding?"


def test_frame_sampling():
    import random

    rng = random.Random(0)
    assert frame_indices(4, 40, "uniform", rng) == [5, 15, 25, 35]
    r = frame_indices(4, 40, "random", rng)
    assert all(10 * i <= x < 10 * (i + 1) for i, x in enumerate(r))
    h = frame_indices(4, 40, "headtail", rng)
    assert len(h) == 4 and all(x < 20 for x in h[:2]) and all(20 <= x < 40 for x in h[2:])
    assert frame_indices(8, 3, "uniform", rng) == sorted(frame_indices(8, 3, "uniform", rng))
    assert len(frame_indices(8, 3, "headtail", rng)) == 8


def test_train_all_captions_once_with_workers(coco, word_tokenizer):
    spec, samples = coco
    loader = build_loader(spec, cfg(caption_per_sample="all"), word_tokenizer)
    seen = Counter()
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, 32, 32) and batch["pixel_values"].dtype == torch.float32
        assert batch["input_ids"].shape[0] == len(batch["caption"]) == len(batch["media_id"])
        assert batch["attention_mask"].shape == batch["input_ids"].shape
        assert batch["skipped"] == {}
        seen.update(zip(batch["media_id"], batch["caption"]))
    assert seen == all_pairs(samples)
    assert loader.faults() == {} and loader.state_dict()["epoch"] == 1


def test_eval_one_entry_per_media_in_order(coco):
    spec, samples = coco
    loader = build_loader(spec, cfg(num_workers=0), None, mode="eval")
    assert len(loader) == 6
    batches = list(loader)
    ids = [i for b in batches for i in b["media_id"]]
    assert ids == [s["json"]["id"] for s in samples]
    captions = [c for b in batches for c in b["captions"]]
    assert captions[3] == [pre_caption(c) for c in samples[3]["json"]["captions"]]
    # eval transform is deterministic: a second pass gives the same pixels
    again = next(iter(build_loader(spec, cfg(num_workers=0), None, mode="eval")))
    assert torch.equal(again["pixel_values"], batches[0]["pixel_values"])


def test_random_caption_mode_and_determinism(coco, word_tokenizer):
    spec, _ = coco

    def run(seed, epoch=0):
        loader = build_loader(spec, cfg(seed=seed), word_tokenizer)
        loader.set_epoch(epoch)
        out = [(b["media_id"], b["caption"], b["pixel_values"]) for b in loader]
        return out

    a, b, c, d = run(1), run(1), run(2), run(1, epoch=1)
    assert len(a) == len(build_loader(spec, cfg(), word_tokenizer))
    assert sorted(i for ids, _, _ in a for i in ids) == sorted("coco_%06d" % i for i in range(24))
    assert [x[:2] for x in a] == [x[:2] for x in b]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(a, b))
    assert [x[0] for x in a] != [x[0] for x in c]
    assert [x[0] for x in a] != [x[0] for x in d]


def test_rank_split_covers_everything_once(coco, word_tokenizer, monkeypatch):
    spec, samples = coco
    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = build_loader(spec, cfg(caption_per_sample="all", num_workers=1), word_tokenizer)
        part = Counter(p for b in loader for p in zip(b["media_id"], b["caption"]))
        assert part and not (set(part) & set(seen))
        seen.update(part)
    assert seen == all_pairs(samples)


def test_resampled_epoch_length(coco, word_tokenizer):
    spec, _ = coco
    loader = build_loader(spec, cfg(resampled=True, train_num_samples=50), word_tokenizer)
    assert len(loader) == 14  # ceil(ceil(50 / 4) / 2) * 2
    sizes = [len(b["media_id"]) for b in loader]
    assert sizes == [4] * 14
    from_manifest = build_loader(spec, cfg(resampled=True, num_workers=0), word_tokenizer)
    assert len(from_manifest) == 6 and len(list(from_manifest)) == 6


@pytest.mark.parametrize("world,per_shard", [(1, 5), (2, 3), (2, 24)])
def test_epoch_length_counts_captions_and_questions(shard_factory, tmp_path, word_tokenizer, monkeypatch, world,
                                                    per_shard):
    """``len`` (what steps per epoch are counted from) equals the batches an epoch gives: one per
    image with a random caption, one per caption (BLIP's epoch), one per question, from the
    manifest's per-shard counts. With one shard for every slot (sample-level splitting) the
    captions are shared in proportion to the samples: within a batch per worker."""
    images = shard_factory.coco(24)
    spec = shard_factory.write(images, str(tmp_path / "coco"), "c", per_shard=per_shard)
    qa = shard_factory.write(shard_factory.vqa(12), str(tmp_path / "vqa"), "q", per_shard=per_shard // 2 or 1,
                             kind="image_qa")
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        for shards, c in [(spec, cfg(batch_size=3)), (spec, cfg(batch_size=3, caption_per_sample="all")),
                          (qa, cfg(batch_size=3, task="qa"))]:
            loader = build_loader(shards, c, word_tokenizer)
            want = len(loader)
            got = len(list(loader))
            assert abs(want - got) <= (2 if per_shard == 24 else 0), (c.caption_per_sample, c.task, want, got)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert len(build_loader(spec, cfg(batch_size=1, num_workers=1, caption_per_sample="all"), word_tokenizer)) \
        == sum(len(s["json"]["captions"]) for s in images) == 72
    assert len(build_loader(spec, cfg(batch_size=1, num_workers=1), word_tokenizer)) == 24
    assert len(build_loader(spec, cfg(batch_size=1, caption_per_sample="all", train_num_samples=10), word_tokenizer)) == 10


def test_old_manifest_without_caption_counts(shard_factory, tmp_path, word_tokenizer):
    """A manifest from before per-shard caption counts: one pair per image still has a length;
    one per caption is an error saying what to do, and the epoch itself still reads every pair."""
    images = shard_factory.coco(6)
    spec = shard_factory.write(images, str(tmp_path), "old", per_shard=3, texts=False)
    assert len(build_loader(spec, cfg(num_workers=1, batch_size=2), word_tokenizer)) == 3
    loader = build_loader(spec, cfg(num_workers=1, batch_size=2, caption_per_sample="all"), word_tokenizer)
    with pytest.raises(TypeError, match=r"no per-shard 'captions' counts .* re-run aurora-shard convert"):
        len(loader)
    assert sum(len(b["caption"]) for b in loader) == sum(len(s["json"]["captions"]) for s in images)


def _stream(loader, stop=None):
    """(media_id, caption, pixel checksum) per batch, up to ``stop`` batches."""
    out = []
    for batch in loader:
        out.append([(m, c, round(float(p.double().sum()), 4))
                    for m, c, p in zip(batch["media_id"], batch["caption"], batch["pixel_values"])])
        if stop is not None and len(out) == stop:
            break
    return out


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world,workers,buffer,per_shard,captions", [
    (2, 2, 20, 6, "random"), (1, 2, 1000, 5, "random"), (2, 2, 7, 24, "random"), (2, 2, 20, 6, "all"),
    (2, 2, 7, 24, "all")])
def test_resume_mid_epoch_is_exact(coco, shard_factory, tmp_path, word_tokenizer, monkeypatch, world, workers,
                                   buffer, per_shard, captions):
    """Stopped after any batch, a fresh loader given the state continues with the very same
    batches (ids, captions, augmented pixels): nothing repeated or skipped within the epoch. Uneven
    workers (5 shards over 2 workers), one shard for 2 ranks x 2 workers (sample-level splitting),
    and one pair per caption (several items per sample: a resume can fall between them)."""
    samples = coco[1]
    spec = shard_factory.write(samples, str(tmp_path), "r", per_shard=per_shard)
    c = cfg(num_workers=workers, shuffle_buffer=buffer, batch_size=3, caption_per_sample=captions)
    union = Counter()
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        full = _stream(build_loader(spec, c, word_tokenizer))
        assert full, "every rank gets data"
        union.update(m for b in full for m, _, _ in b)
        for stop in sorted({1, 2, len(full) // 2, len(full) - 1, len(full)}):
            first = build_loader(spec, c, word_tokenizer)
            head = _stream(first, stop)
            state = json.loads(json.dumps(first.state_dict()))
            resumed = build_loader(spec, c, word_tokenizer)
            resumed.load_state_dict(state)
            tail = _stream(resumed)
            assert head + tail == full, (rank, stop)
            assert resumed.state_dict()["epoch"] == 1
    per_sample = {s["json"]["id"]: len(s["json"]["captions"]) if captions == "all" else 1 for s in samples}
    assert union == Counter(per_sample)  # every sample (or caption) once over the ranks


@pytest.mark.timeout(240)
def test_resampled_resume_mid_epoch_is_exact(coco, word_tokenizer, monkeypatch):
    """Resampled mode resumes exactly too: the shard draws of a slot depend on (seed, epoch, rank,
    worker) alone, the resumed workers drop the items they had handed out, and each worker's
    remaining share of the epoch (``train_num_samples``) is what it had left."""
    spec, _ = coco
    c = cfg(batch_size=3, resampled=True, train_num_samples=30)
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        full = _stream(build_loader(spec, c, word_tokenizer))
        assert len(full) == 6  # ceil(ceil(30 / (3 x 2 ranks)) / 2 workers) x 2
        for stop in (1, 2, 5):
            first = build_loader(spec, c, word_tokenizer)
            head = _stream(first, stop)
            resumed = build_loader(spec, c, word_tokenizer)
            resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
            assert len(resumed) == len(full) - stop
            assert head + _stream(resumed) == full, (rank, stop)
            assert resumed.state_dict()["epoch"] == 1


@pytest.mark.timeout(240)
@pytest.mark.parametrize("resampled", [False, True])
def test_epochs_started_ahead_are_the_epochs_read_alone(coco, word_tokenizer, resampled):
    """One loader read epoch after epoch starts each next epoch's workers before the current
    epoch ends (and ``prefetch`` the first one's before iterating); its batches are exactly those
    of a fresh loader per epoch, whose workers start when it is iterated."""
    spec, _ = coco
    c = cfg(batch_size=3, resampled=resampled)
    ahead = build_loader(spec, c, word_tokenizer)
    ahead.prefetch()
    assert ahead._ahead is not None
    epochs = []
    for epoch in range(3):
        ahead.set_epoch(epoch)
        epochs.append(_stream(ahead))
        assert ahead._ahead is not None and ahead._ahead[0] == epoch + 1  # started during this epoch
    for epoch, batches in enumerate(epochs):
        alone = build_loader(spec, c, word_tokenizer)
        alone.set_epoch(epoch)
        assert _stream(alone) == batches, epoch
    assert epochs[0] != epochs[1]
    ahead.set_epoch(7)  # an epoch other than the one started: its workers are dropped
    assert ahead._ahead is None
    ahead.last_epoch = 7  # the caller's last epoch: nothing is started after it
    _stream(ahead)
    assert ahead._ahead is None


def test_qa_batches(tmp_path, shard_factory, word_tokenizer):
    samples = shard_factory.vqa(6)
    spec = shard_factory.write(samples, str(tmp_path), "vqa", per_shard=3, kind="image_qa")
    batches = list(build_loader(spec, cfg(task="qa", num_workers=0, shuffle_buffer=1, batch_size=5),
                                word_tokenizer))
    qids = [q for b in batches for q in b["question_id"]]
    assert sorted(qids) == sorted(q["question_id"] for s in samples for q in s["json"]["questions"])
    b = batches[0]
    assert b["answers"][0] == ["cat", "dog"] and b["answer_weights"][0] == [0.75, 0.25]
    assert b["question"][0].startswith("what is in picture") and "?" in b["question"][0]
    assert b["input_ids"].shape[0] == len(b["question"])


def test_hf_tokenizer(coco, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "number", "caption"]))
    tok = BertTokenizerFast(vocab_file=str(vocab))
    batch = next(iter(build_loader(coco[0], cfg(num_workers=0, max_tokens=6), tok)))
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] <= 6
    assert (batch["input_ids"][:, 0] == tok.cls_token_id).all()


def corrupt_shards(tmp_path, shard_factory, kind):
    """Six samples in two shards; one has broken media bytes, one lacks its json."""
    samples = shard_factory.coco(6) if kind == "image" else shard_factory.msrvtt(6)
    ext = "jpg" if kind == "image" else "mp4"
    samples[1][ext] = samples[1][ext][: len(samples[1][ext]) // 3]  # truncated media
    samples[4][ext] = b"\x00garbage" * 50
    del samples[5]["json"]
    return shard_factory.write(samples, str(tmp_path), kind, per_shard=3, kind=kind)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_corrupt_media_skipped_and_counted(tmp_path, shard_factory, word_tokenizer, kind):
    """Skipped samples are counted as skipped, not missing: the epoch ends without a shortfall at
    the default missing_tolerance 0; only samples neither delivered nor skipped are missing."""
    spec = corrupt_shards(tmp_path, shard_factory, kind)
    c = cfg(media=kind, num_workers=2, max_words=20)
    loader = build_loader(spec, c, word_tokenizer)
    batches = list(loader)
    ids = sorted(i for b in batches for i in b["media_id"])
    assert len(ids) == 3
    reason = "decode_" + kind
    assert loader.faults() == {reason: 2, "missing_field": 1}
    per_batch = Counter()
    for b in batches:
        per_batch.update(b["skipped"])
        if kind == "video":
            assert b["pixel_values"].shape[1:] == (4, 3, 32, 32)
    assert per_batch[reason] + per_batch["missing_field"] <= 3  # some land in info-only batches
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"][kind + "-000001.tar"]["count"] = 4  # the shard lost a sample
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataShortfallError, match=r"delivered 3 and skipped 3 of the 7 samples .*\(1 missing"):
        list(build_loader(spec, c, word_tokenizer))


def test_fewer_than_manifest_fails_loudly(tmp_path, shard_factory, word_tokenizer):
    spec = shard_factory.write(shard_factory.coco(8), str(tmp_path), "short", per_shard=4)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest["shards"]["short-000001.tar"]["count"] = 7  # the shard lost 3 samples
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataShortfallError, match=r"delivered 8 and skipped 0 of the 11 samples .* 2 shard"):
        list(build_loader(spec, cfg(), word_tokenizer))
    assert len(list(build_loader(spec, cfg(missing_tolerance=0.3), word_tokenizer))) > 0


def test_truncated_tar_names_url(tmp_path, shard_factory, word_tokenizer, caplog):
    spec = shard_factory.write(shard_factory.coco(8), str(tmp_path), "trunc", per_shard=4)
    bad = tmp_path / "trunc-000001.tar"
    # Cut inside a member's data: a cut inside a header (where a cut at a fixed fraction of the file
    # can land, depending on the JPEG sizes) reads as a clean end of the tar.
    with tarfile.open(bad) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".jpg")][1]
    data = bad.read_bytes()
    bad.write_bytes(data[: member.offset_data + member.size // 2])
    loader = build_loader(spec, cfg(num_workers=0, max_shard_retries=1), word_tokenizer)
    with pytest.raises(ShardError, match=r"trunc-000001\.tar after 2 attempt"):
        list(loader)
    assert "trunc-000001.tar" in caplog.text and "retrying (1/1)" in caplog.text


def test_missing_shard_names_url(tmp_path, shard_factory, word_tokenizer):
    spec = shard_factory.write(shard_factory.coco(8), str(tmp_path), "gone", per_shard=4)
    os.remove(tmp_path / "gone-000000.tar")
    with pytest.raises(ShardError, match=r"gone-000000\.tar after 3 attempt.*FileNotFoundError"):
        list(build_loader(spec, cfg(num_workers=2), word_tokenizer))


def test_config_validation():
    with pytest.raises(ValueError, match="task"):
        LoaderConfig(task="captioning")
    with pytest.raises(ValueError, match="missing_tolerance"):
        LoaderConfig(missing_tolerance=1.5)
    with pytest.raises(ValueError, match="frame_sampling"):
        LoaderConfig(frame_sampling="middle")
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_member_mb must be a positive finite number"):
            LoaderConfig(max_member_mb=bad)


def test_pipe_and_http_urls_are_quoted(tmp_path, shard_factory, word_tokenizer):
    import functools
    import http.server
    import threading

    evil = "x;touch${IFS}PWNED;$(touch${IFS}PWNED2)"
    (tmp_path / "srv").mkdir()
    shard_factory.write(shard_factory.coco(4), str(tmp_path / "srv"), "e", per_shard=4)
    os.rename(tmp_path / "srv" / "e-000000.tar", tmp_path / "srv" / (evil + ".tar"))
    cmd = curl_command("http://h/" + evil)
    assert cmd.endswith("'http://h/%s'" % evil)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        from urllib.parse import quote

        url = "http://127.0.0.1:%d/%s" % (server.server_address[1], quote(evil, safe=";${}()") + ".tar")
        got = [i for b in build_loader(url, cfg(num_workers=0), word_tokenizer) for i in b["media_id"]]
        assert sorted(got) == ["coco_%06d" % i for i in range(4)]
        # a user's pipe: URL runs through the shell as written (here: a command with a pipe)
        pipe = "pipe:cat %s | cat" % shlex.quote(str(tmp_path / "srv" / (evil + ".tar")))
        got = [i for b in build_loader(pipe, cfg(num_workers=0), word_tokenizer) for i in b["media_id"]]
        assert sorted(got) == ["coco_%06d" % i for i in range(4)]
    finally:
        os.chdir(cwd)
        server.shutdown()
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()


def test_no_manifest_reads_without_check(tmp_path, shard_factory, word_tokenizer, caplog):
    spec = shard_factory.write(shard_factory.coco(5), str(tmp_path), "bare", per_shard=5, manifest=False)
    loader = build_loader(spec, cfg(num_workers=0), word_tokenizer)
    assert "sample count unknown" in caplog.text
    with pytest.raises(TypeError, match="no manifest.json/sizes.json next to the shards"):
        len(loader)
    assert sorted(i for b in loader for i in b["media_id"]) == ["coco_%06d" % i for i in range(5)]
    with pytest.raises(ValueError, match="resampled mode needs train_num_samples"):
        build_loader(spec, cfg(resampled=True), word_tokenizer)


STALL = """
import sys
from aurora_ds.data import LoaderConfig, build_loader
cfg = LoaderConfig(image_size=32, batch_size=4, num_workers=1, worker_timeout=2)
list(build_loader(sys.argv[1], cfg, None, mode="eval"))
"""


@pytest.mark.timeout(120)
def test_stalled_worker_times_out(coco):
    """The timeout names the shard and what the worker was doing, and the stalled worker prints
    where it waits (its stack). In a process of its own: workers write to the stderr the process
    had when its first loader started them, as in a real run (pytest swaps stderr per test)."""
    url = "pipe:sleep 15; cat %s" % shlex.quote(expand_urls(coco[0])[0])
    run = subprocess.run([sys.executable, "-c", STALL, url], capture_output=True, text=True, timeout=100)
    assert run.returncode != 0
    assert re.search(r"TimeoutError: DataLoader timed out .* 1 shard\(s\) starting pipe:sleep 15; cat .*; "
                     r"worker 0 \(pid \d+, stacks printed above\): reading pipe:sleep 15; cat .*, "
                     r"0 batch\(es\) made", run.stderr), run.stderr[-3000:]
    assert "most recent call first" in run.stderr and "read_shards" in run.stderr, run.stderr[-3000:]


def test_engine_reads_answers_and_text_through_the_shard_contract(tmp_path, shard_factory):
    """The answer list comes from the answers.json written beside the training shards (the shards
    are not read: they may be gone), once, into the run; the tokenizer corpus from shard_format's
    one reader. eval.answer_list wins; a missing source names the key and the path."""
    from aurora_ds.data.shard_format import ANSWERS, question
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.data import answer_list, shard_texts
    from aurora_ds.engine.rundir import RunDir

    samples = shard_factory.vqa(5)
    samples[0]["json"]["questions"].append(question(99, "What else?", ["dog"] * 7 + ["bird"]))
    spec = shard_factory.write(samples, str(tmp_path / "vqa"), "vqa", per_shard=2, kind="image_qa")
    want = [t for s in samples for q in s["json"]["questions"] for t in [q["question"], *q["answers"]]]
    assert list(shard_texts(spec)) == want
    for url in expand_urls(spec):
        os.remove(url)
    cfg = build_config("", {"objective.task": "qa", "data.train_shards": spec})
    run = RunDir(tmp_path / "run")
    assert answer_list(cfg, run) == ["cat", "dog", "bird"]  # 21 cats, 7 + 7 dogs, 1 bird
    assert json.loads(run.answer_list.read_text()) == ["cat", "dog", "bird"]
    assert answer_list(cfg, run, size=2) == ["cat", "dog"]
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(["yes", "no"]))
    assert answer_list(build_config("", {"data.train_shards": spec, "eval.answer_list": str(mine)}), run) == ["yes", "no"]
    os.remove(tmp_path / "vqa" / ANSWERS)
    with pytest.raises(FileNotFoundError, match=r"data.train_shards=.*no answers.json at .*vqa/answers.json"):
        answer_list(cfg, RunDir(tmp_path / "run2"))
    with pytest.raises(FileNotFoundError, match=r"eval.answer_list=.*gone.json: the answer list file does not exist"):
        answer_list(build_config("", {"data.train_shards": spec, "eval.answer_list": str(tmp_path / "gone.json")}), run)


def test_undecodable_text_is_skipped_counted_and_named_when_training_a_tokenizer(tmp_path, shard_factory):
    """A caption that is not UTF-8 crashed tokenizer training with a bare UnicodeDecodeError, naming
    no shard. As in the loader, a sample whose text cannot be read is skipped and counted; the run
    says how many, why, and the first one's shard and key when the tokenizer is trained."""
    from aurora_ds.data.shard_format import JSON, KEY, encode_meta
    from aurora_ds.engine.config import build_config
    from aurora_ds.engine.data import SkippedSamples, resolve_tokenizer, shard_texts

    good, latin1, typed = shard_factory.coco(3, prefix="txt")
    blobs = {good[KEY]: encode_meta(good[JSON]), latin1[KEY]: '{"captions": ["un caf\xe9 au lait"]}'.encode("latin-1"),
             typed[KEY]: encode_meta(dict(typed[JSON], captions=["fine", 7]))}
    url = str(tmp_path / "txt-000000.tar")
    with tarfile.open(url, "w") as tar:
        for key, blob in blobs.items():
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    skipped = SkippedSamples()
    assert list(shard_texts(url, skipped)) == good[JSON]["captions"]
    assert skipped.counts == {"bad_json": 1, "missing_field": 1}
    assert str(skipped).startswith(f"skipped 2 sample(s) (bad_json: 1, missing_field: 1); first: shard {url}, "
                                   f"sample {latin1[KEY]!r}: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9")
    said = []
    tokenizer = resolve_tokenizer(build_config("", {"data.train_shards": url, "output.dir": str(tmp_path / "run")}),
                                  512, said.append)
    assert tokenizer("a photo")["input_ids"] and len(said) == 1
    assert said[0].startswith(f"[aurora] tokenizer trained on data.train_shards={url}: skipped 2 sample(s)")
    assert f"shard {url}, sample {latin1[KEY]!r}" in said[0]


def _rank_builds(rank, port, train_spec, qa_spec, out, results):
    """One rank of the test below: its own output.dir, as on a node that shares no filesystem."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from aurora_ds.engine.config import build_config
        from aurora_ds.engine.data import answer_list, resolve_tokenizer
        from aurora_ds.engine.rundir import RunDir

        own = os.path.join(out, f"node{rank}")
        tokenizer = resolve_tokenizer(build_config("", {"data.train_shards": train_spec, "output.dir": own}), 512)
        answers = answer_list(build_config("", {"objective.task": "qa", "data.train_shards": qa_spec, "output.dir": own}),
                              RunDir(own))
        results.put((rank, tokenizer("two red circles")["input_ids"], answers,
                     sorted(os.listdir(RunDir(own).tokenizer)), os.path.exists(RunDir(own).answer_list)))
    except BaseException as e:  # reported to the parent, which fails the test
        results.put((rank, f"{type(e).__name__}: {e}"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.timeout(180)
def test_what_rank0_builds_reaches_ranks_that_share_no_filesystem(tmp_path, shard_factory):
    """The tokenizer trained on the captions and the VQA answer list are built by rank 0 and sent
    to every rank: a rank whose output.dir is another folder (another node's disk) gets the same
    tokenizer, saved into its own run, and the same answers."""
    import torch.multiprocessing as mp
    from aurora_ds.dist import free_port

    train = shard_factory.write(shard_factory.coco(6), str(tmp_path / "coco"), "coco", per_shard=3)
    qa = shard_factory.write(shard_factory.vqa(4), str(tmp_path / "vqa"), "vqa", per_shard=2, kind="image_qa")
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank_builds, args=(free_port(), train, qa, str(tmp_path / "runs"), results), nprocs=2,
                       join=True, start_method="spawn")
    got = {row[0]: row[1:] for row in (results.get(), results.get())}
    assert all(len(v) == 4 for v in got.values()), got
    assert got[0][0] == got[1][0] and len(got[0][0]) > 3  # the same ids from the same tokenizer
    assert got[0][1] == got[1][1] and "cat" in got[0][1]
    assert got[1][2] == got[0][2] and "tokenizer.json" in got[1][2]  # saved into rank 1's own run
    assert got[0][3] and not got[1][3]  # only rank 0 keeps the answer list (the adapter carries it)


@pytest.mark.timeout(120)
def test_one_shard_two_ranks_both_get_data(tmp_path, shard_factory, word_tokenizer, monkeypatch, caplog):
    samples = shard_factory.coco(10)
    spec = shard_factory.write(samples, str(tmp_path), "one", per_shard=10)
    seen = Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = build_loader(spec, cfg(num_workers=2, batch_size=2), word_tokenizer)
        assert len(loader) >= 2
        ids = [m for b in loader for m in b["media_id"]]
        assert ids
        seen.update(ids)
    assert "splitting by sample" in caplog.text
    assert seen == Counter(s["json"]["id"] for s in samples)


@pytest.mark.timeout(120)
def test_all_samples_skipped_is_an_error_not_an_empty_epoch(tmp_path, shard_factory, word_tokenizer, monkeypatch):
    samples = shard_factory.coco(6)
    for s in samples:
        s["jpg"] = b"not a jpeg"
    spec = shard_factory.write(samples, str(tmp_path), "skip", per_shard=3, manifest=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = build_loader(spec, cfg(num_workers=2), word_tokenizer)
    with pytest.raises(EmptyEpochError, match=r"epoch 0 gave no training batch on rank 1: rank 1 of 2 reads 2 of 2 "
                                              r"shard.*skip-0000.*decode_image.*Remedy"):
        list(loader)


def test_shard_named_twice(coco, word_tokenizer, caplog):
    spec = coco[0]
    twice = spec + "::" + expand_urls(spec)[0]
    with pytest.raises(ValueError, match=r"evaluation spec names 1 shard\(s\) more than once .*coco-train-000000"):
        build_loader(twice, cfg(), None, mode="eval")
    build_loader(twice, cfg(), word_tokenizer)
    assert "training spec names 1 shard(s) more than once" in caplog.text


@pytest.mark.timeout(120)
def test_img2dataset_layout_trains_and_evaluates(tmp_path, shard_factory, word_tokenizer):
    samples = shard_factory.coco(10)
    spec = shard_factory.write_img2dataset(samples, str(tmp_path / "i2d"), per_shard=4)
    loader = build_loader(spec, cfg(num_workers=2, batch_size=3), word_tokenizer)
    assert len(loader) == 4  # from sizes.json: 4+4+2 samples over 2 workers
    pairs = sorted((m, c) for b in loader for m, c in zip(b["media_id"], b["caption"]))
    assert len(pairs) == 10 and loader.faults() == {}
    assert ("000000000", pre_caption(samples[0]["json"]["captions"][0])) in pairs
    ev = [c for b in build_loader(spec, cfg(num_workers=0), None, mode="eval") for c in b["captions"]]
    assert ev == [[pre_caption(s["json"]["captions"][0])] for s in samples]


@pytest.mark.timeout(120)
def test_shard_where_no_sample_fits_the_layout_fails(tmp_path, shard_factory, word_tokenizer):
    """A shard none of whose samples the loader can read is a ShardError naming the shard, its
    first sample's members, what was expected and the kind its manifest declares (here a
    retrieval set given to a QA task), not a whole shard of skips."""
    import webdataset as wds

    os.makedirs(tmp_path / "odd")
    with wds.TarWriter(str(tmp_path / "odd" / "x-0.tar"), encoder=False) as writer:
        for i, s in enumerate(shard_factory.coco(3)):
            writer.write({"__key__": "k%d" % i, "jpg": s["jpg"], "cls": b"3"})
    with pytest.raises(ShardError, match=r"x-0\.tar is in a layout the loader cannot read: none of its 3 sample\(s\) "
                                         r"fits; the first, 'k0', holds \['cls', 'jpg'\]; expected .*json with "
                                         r"'captions'.*txt.*; no manifest.json declares its kind"):
        list(build_loader(str(tmp_path / "odd" / "x-0.tar"), cfg(num_workers=1), word_tokenizer))
    spec = shard_factory.write(shard_factory.coco(4), str(tmp_path / "coco"), "c", per_shard=2)
    with pytest.raises(ShardError, match=r"c-00000[01]\.tar is in a layout the loader cannot read: none of its 2 "
                                         r"sample\(s\) fits; the first, 'coco_00000[02]', holds \['jpg', 'json'\]; "
                                         r"expected .*json with 'questions' \(aurora-shard\); its manifest.json "
                                         r"declares kind 'image'"):
        list(build_loader(spec, cfg(task="qa", num_workers=0), word_tokenizer))


def _damage(sample, fault):
    """``sample`` with one sample-level fault."""
    if fault == "undecodable image":
        sample["jpg"] = b"\xff\xd8 not a jpeg"
    elif fault == "json not UTF-8":
        sample["json"] = '{"id": "x", "captions": ["un caf\xe9"]}'.encode("latin-1")
    elif fault == "json without captions":
        del sample["json"]["captions"]
    elif fault == "no json member":
        del sample["json"]
    else:
        del sample["jpg"]


FAULTS = {"undecodable image": "decode_image", "json not UTF-8": "bad_json", "json without captions": "missing_field",
          "no json member": "missing_field", "no media member": "missing_field"}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("where", ["first", "middle", "last", "first of rank 1"])
def test_one_rule_for_bad_samples_wherever_they_sit(tmp_path, shard_factory, word_tokenizer, monkeypatch, fault,
                                                    where):
    """A bad sample is skipped and counted under its fault's reason, the same reason wherever it
    sits (first, middle or last of a shard, first sample a rank reads), the others are all
    delivered, and the epoch has no shortfall at missing_tolerance 0."""
    from aurora_ds.data.loader import epoch_plan

    samples = shard_factory.coco(12, prefix="bad")
    spec = str(tmp_path / "b-{000000..000003}.tar")
    c = cfg(num_workers=0, batch_size=5)
    rank1_first = expand_urls(spec).index(epoch_plan(expand_urls(spec), c.seed, 0, True, 1, 2, 1).shards[0]) * 3
    bad = {"first": 0, "middle": 1, "last": 2, "first of rank 1": rank1_first}[where]
    _damage(samples[bad], fault)
    shard_factory.write(samples, str(tmp_path), "b", per_shard=3)
    ids, faults = Counter(), Counter()
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = build_loader(spec, c, word_tokenizer)
        ids.update(m for b in loader for m in b["media_id"])
        faults.update(loader.faults())
    assert faults == {FAULTS[fault]: 1}
    assert ids == Counter(s["__key__"] for i, s in enumerate(samples) if i != bad)


@pytest.mark.timeout(120)
def test_skipped_samples_are_counted_once_across_a_resume(tmp_path, shard_factory, word_tokenizer, caplog):
    """A sample skipped before a stop and seen again by the resumed workers is not counted twice:
    the faults of the first run and of the resumed one add up to the one skip, and the epoch ends
    with neither a shortfall nor more samples than the manifest lists."""
    samples = shard_factory.coco(12, prefix="res")
    for i in (0, 7):
        _damage(samples[i], "json not UTF-8")
    spec = shard_factory.write(samples, str(tmp_path), "res", per_shard=3)
    c = cfg(batch_size=2)
    full = _stream(build_loader(spec, c, word_tokenizer))
    for stop in range(1, len(full)):
        first = build_loader(spec, c, word_tokenizer)
        head = _stream(first, stop)
        resumed = build_loader(spec, c, word_tokenizer)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert head + _stream(resumed) == full, stop
        assert Counter(first.faults()) + Counter(resumed.faults()) == {"bad_json": 2}, stop
    assert "stale" not in caplog.text


def test_oversized_member_is_skipped_unread(tmp_path, shard_factory, word_tokenizer, caplog):
    """A member over max_member_mb is never read into memory (its header gives its size): its
    sample is skipped as member_too_large, naming the member, and the others are delivered."""
    from aurora_ds.data.shard_format import TOO_LARGE, iter_tar_samples

    samples = shard_factory.coco(6, prefix="big")
    samples[2]["jpg"] += b"\0" * 20000  # still a decodable JPEG, ~20 KB over the cap below
    spec = shard_factory.write(samples, str(tmp_path), "big", per_shard=3)
    assert all(len(s["jpg"]) < 10000 for i, s in enumerate(samples) if i != 2)
    with open(tmp_path / "big-000000.tar", "rb") as f:
        read = list(iter_tar_samples(f, max_member_bytes=10000))
    assert "jpg" not in read[2] and read[2][TOO_LARGE] == {"jpg": len(samples[2]["jpg"])}
    assert all("jpg" in s and TOO_LARGE not in s for i, s in enumerate(read) if i != 2)
    loader = build_loader(spec, cfg(num_workers=0, max_member_mb=0.01), word_tokenizer, mode="eval")
    ids = [m for b in loader for m in b["media_id"]]
    assert ids == [s["__key__"] for i, s in enumerate(samples) if i != 2]
    assert loader.faults() == {"member_too_large": 1}
    assert "big_000002.jpg is %d bytes, over max_member_mb=0.01" % len(samples[2]["jpg"]) in caplog.text
    assert len([m for b in build_loader(spec, cfg(num_workers=0), None, mode="eval") for m in b["media_id"]]) == 6

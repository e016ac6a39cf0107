"""Annotation + media -> WebDataset tar shards, sizes.json and manifest.json (and, for QA, the
answer counts answers.json), locally or on S3.

The shard layout (keys, json fields, stored formats, manifest files) is ``aurora_ds.data.shard_format``'s;
images in a format the loader does not read (BMP, GIF) are re-encoded as PNG and counted in the
manifest's ``reencoded``.

Media are read and decode-checked in worker processes and written in annotation order, so the
same input gives byte-identical shards whatever the number of workers. Each finished shard is
written to a local temp dir, copied/uploaded to the destination and recorded in
manifest.partial.json; a re-run with the same input and settings keeps the shards recorded there
that are still intact and continues after them.
"""

import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
from collections import Counter

import webdataset as wds

from aurora_ds.data import shard_format, storage
from aurora_ds.data.shard_format import join, write_json

from .annotations import KINDS, read_records, sample_key, sample_meta
from .faults import Faults
from .media import load_media

PARTIAL = "manifest.partial.json"
# Bounded read-ahead: workers never run more than this many samples ahead of the writer.
WINDOW_PER_WORKER = 32


class ConvertError(Exception):
    """Input faults under --strict; nothing has been written."""


def shard_name(dataset, split, index):
    return f"{dataset}-{split}-{index:06d}.tar"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def remove(url):
    if storage.is_s3(url):
        storage.s3_filesystem().rm_file(url[len("s3://"):])
    elif os.path.exists(url):
        os.remove(url)


def iter_media(records, media_root, resize, workers, start=0):
    """(index, ext, bytes, fault) for records[start:], in order, read by `workers` processes.

    Workers are spawned, not forked: the parent may already hold s3fs's event-loop thread.
    """
    tasks = [(i, os.path.join(media_root, records[i].file), resize) for i in range(start, len(records))]
    if workers <= 1:
        yield from map(load_media, tasks)
        return
    window = workers * WINDOW_PER_WORKER
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i in range(0, len(tasks), window):
            yield from pool.imap(load_media, tasks[i:i + window], chunksize=4)


def media_fault(faults, record, fault):
    reason, message = fault
    faults.add(reason, {"id": record.id, "file": record.file, "error": message})


def shard_intact(url, entry):
    """A recorded shard counts as done if present with the recorded size (and checksum, locally)."""
    try:
        if storage.size(url) != entry["bytes"]:
            return False
    except FileNotFoundError:
        return False
    return storage.is_s3(url) or sha256_file(url) == entry["sha256"]


def resume_point(out, settings, log):
    """The intact shards of an earlier interrupted run with the same settings, in order."""
    url = join(out, PARTIAL)
    if not storage.exists(url):
        return []
    partial = json.loads(storage.read_bytes(url))
    if partial.get("settings") != settings:
        print(f"ignoring {PARTIAL}: written for other input or settings", file=log)
        return []
    done = []
    for entry in partial["shards"]:
        if not shard_intact(join(out, entry["name"]), entry):
            print(f"shard {entry['name']} incomplete or changed: rewriting from there", file=log)
            break
        done.append(entry)
    if done:
        print(f"resuming: {len(done)} complete shard(s) kept, up to {done[-1]['name']}", file=log)
    return done


class ShardSink:
    """Writes samples into consecutive shards and publishes each one when it is full.

    A new shard starts when the current one holds `maxcount` samples or the next sample would
    take its payload past `maxsize` bytes (a single larger sample still gets its own shard).
    """

    def __init__(self, out, dataset, split, maxcount, maxsize, settings, done, log):
        self.out, self.dataset, self.split = out, dataset, split
        self.maxcount, self.maxsize = maxcount, maxsize
        self.settings, self.done, self.log = settings, list(done), log
        # Images stored re-encoded, per source extension; kept per shard so a resumed run reports all.
        self.reencoded = Counter(done[-1].get("reencoded", {}) if done else {})
        self.tmp = tempfile.TemporaryDirectory(prefix="aurora-shard-")
        self.writer = None

    def write(self, sample, size, texts, index, faults):
        """Add a sample (``texts``: its ``shard_format.text_counts``); `index` is its record
        position, recorded as where a shard ends."""
        if self.writer and (self.count >= self.maxcount or self.size + size > self.maxsize):
            self.finish(index, faults)
        if self.writer is None:
            self.name = shard_name(self.dataset, self.split, len(self.done))
            self.path = os.path.join(self.tmp.name, self.name)
            self.stream = open(self.path, "wb")
            self.writer = wds.TarWriter(self.stream, encoder=False, mtime=0)
            self.count = self.size = 0
            self.texts = Counter()
        self.writer.write(sample)
        self.count += 1
        self.size += size
        self.texts.update(texts)

    def finish(self, end, faults):
        """Close the open shard, publish it and record it (with the fault state) for resuming."""
        if self.writer is None:
            return
        self.writer.close()
        self.stream.close()
        self.writer = None
        entry = {"name": self.name, "count": self.count, **self.texts, "bytes": os.path.getsize(self.path),
                 "sha256": sha256_file(self.path), "end": end, "faults": faults.state(),
                 "reencoded": dict(self.reencoded)}
        storage.put_file(self.path, join(self.out, self.name))
        os.remove(self.path)
        self.done.append(entry)
        write_json(join(self.out, PARTIAL), {"format": 1, "settings": self.settings, "shards": self.done})
        print(f"wrote {self.name}: {entry['count']} samples, {entry['bytes']} bytes", file=self.log)

    def close(self):
        self.tmp.cleanup()


def answer_counts(records, dataset, split):
    """{answer: count} over every human answer of the split's annotations (what the VQA answer
    list is built from; a test split without answers gives none)."""
    counts = Counter()
    for record in records:
        counts.update(shard_format.answer_counts(sample_meta(record, dataset, split)))
    return counts


def check_all_media(records, media_root, resize, workers, faults):
    """Read and decode every file once without writing anything (for --strict)."""
    for index, _, _, fault in iter_media(records, media_root, resize, workers):
        if fault:
            media_fault(faults, records[index], fault)


def convert(dataset, anns, media_root, split, out, workers=1, maxcount=10000, maxsize=3 * 10**9,
            resize=None, strict=False, log=None):
    """Convert one dataset split; returns the manifest. Faults are counted and reported; under
    `strict` any fault raises ConvertError before anything is written."""
    log = log or sys.stderr
    if dataset not in KINDS:
        raise ValueError(f"unknown dataset {dataset!r}; choose from {sorted(KINDS)}")
    faults = Faults()
    records = read_records(dataset, anns, split, media_root, faults)
    if strict and not faults:
        check_all_media(records, media_root, resize, workers, faults)
    if strict and faults:
        for line in faults.report():
            print(line, file=log)
        raise ConvertError(f"{sum(faults.counts.values())} input fault(s) under --strict; nothing written")

    sources = [{"annotation": os.path.basename(a), "sha256": sha256_file(a)} for a in anns]
    settings = {"dataset": dataset, "split": split, "maxcount": maxcount, "maxsize": maxsize,
                "resize": resize, "records": len(records), "sources": sources}
    done = resume_point(out, settings, log)
    start = done[-1]["end"] if done else 0
    if done:
        faults = Faults.from_state(done[-1]["faults"])

    sink = ShardSink(out, dataset, split, maxcount, maxsize, settings, done, log)
    try:
        for index, ext, data, fault in iter_media(records, media_root, resize, workers, start):
            record = records[index]
            if fault:
                media_fault(faults, record, fault)
                continue
            source_ext = shard_format.file_ext(record.file)
            if ext != source_ext:
                sink.reencoded[source_ext] += 1
            meta = sample_meta(record, dataset, split)
            sample = shard_format.encode_sample(sample_key(dataset, record.id), ext, data, meta)
            sink.write(sample, len(data) + len(sample[shard_format.JSON]), shard_format.text_counts(meta), index, faults)
        sink.finish(len(records), faults)
    finally:
        sink.close()

    shards = {e["name"]: {k: e[k] for k in ("count", *shard_format.TEXT_FIELDS, "bytes", "sha256") if k in e}
              for e in sink.done}
    manifest = {
        "format": 1,
        "dataset": dataset,
        "split": split,
        "kind": KINDS[dataset],
        "num_samples": sum(e["count"] for e in shards.values()),
        "shards": shards,
        "source": {**sources[0], "all": sources},
        "settings": {"maxcount": maxcount, "maxsize": maxsize, "resize": resize},
        "faults": dict(faults.counts),
        "fault_examples": faults.examples,
        "reencoded": dict(sink.reencoded),
    }
    shard_format.write_manifest(out, manifest)
    if KINDS[dataset].endswith("_qa"):
        shard_format.write_answers(out, answer_counts(records, dataset, split))
    remove(join(out, PARTIAL))
    for line in faults.report():
        print(line, file=log)
    if sink.reencoded:
        print(f"re-encoded {sum(sink.reencoded.values())} image(s) as {shard_format.REENCODE_AS} "
              f"({', '.join(f'{k}: {n}' for k, n in sorted(sink.reencoded.items()))}): the loader reads "
              f"{'/'.join(shard_format.IMAGE_EXTS)} only", file=log)
    print(f"{dataset} {split}: {manifest['num_samples']} samples in {len(shards)} shard(s) -> {out}", file=log)
    return manifest

"""Read every shard, decode every sample and check it all against the manifest next to the shards.

Shards are read with the loader's own reader and checked against the shard contract
(``aurora_ds.data.shard_format``), so what verify passes is what the loader trains on.
"""

import hashlib
import json
import tarfile
from collections import Counter

from braceexpand import braceexpand

from aurora_ds.data import shard_format, storage
from aurora_ds.data.shard_format import JSON, KEY, MANIFEST, SIZES, media_kind

from .media import decode_media


class HashingReader:
    """File wrapper that hashes and counts the bytes tarfile reads through it."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.bytes = 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self):
        while self.read(1 << 20):
            pass


def check_sample(key, fields):
    """Problems with one sample: its json must parse and carry text, its media must decode, and no
    member may exceed the loader's default ``max_member_mb`` (the loader would skip the sample)."""
    too_large = fields.pop(shard_format.TOO_LARGE, {})
    problems = [f"{ext}: {size} bytes, over the loader's default max_member_mb={shard_format.MAX_MEMBER_MB:g} "
                f"(data.max_member_mb)" for ext, size in too_large.items()]
    media = [ext for ext in fields if media_kind(ext)]
    if not media and not too_large:
        problems.append("no image/video field")
    if JSON not in fields:
        problems.append("no json field")
    else:
        try:
            meta = json.loads(fields[JSON].decode("utf-8"))
            if not shard_format.has_text(meta):
                problems.append("json has no captions or questions")
        except ValueError as exn:
            problems.append(f"json: {exn}")
    for ext in media:
        try:
            decode_media(ext, fields[ext])
        except Exception as exn:  # any decoder failure is a corrupt sample, reported by name
            problems.append(f"{ext}: {type(exn).__name__}: {exn}")
    return problems


class Report:
    def __init__(self):
        self.problems = []
        self.shards = self.samples = self.images = self.videos = 0
        self.keys = {}

    def problem(self, line):
        self.problems.append(line)


def text_counts(fields):
    """The sample's captions/questions count (``shard_format.text_counts``); none for broken json."""
    try:
        return shard_format.text_counts(json.loads(fields[JSON].decode("utf-8")))
    except (KeyError, ValueError, AttributeError, TypeError):
        return {}


def read_shard(url, report):
    """Decode every sample of one shard; returns (count, bytes, sha256, {"captions"|"questions": n})
    or None if unreadable."""
    count, texts = 0, Counter()
    with storage.open_url(url, "rb") as f:
        reader = HashingReader(f)
        try:
            for fields in shard_format.iter_tar_samples(
                    reader, max_member_bytes=int(shard_format.MAX_MEMBER_MB * 2**20)):
                texts.update(text_counts(fields))
                count += check_and_count(url, fields.pop(KEY), fields, report)
            reader.drain()
        except (tarfile.TarError, EOFError, OSError) as exn:
            report.problem(f"TRUNCATED {url}: {type(exn).__name__}: {exn} (after {count} complete samples)")
            return None
    return count, reader.bytes, reader.digest.hexdigest(), texts


def check_and_count(url, key, fields, report):
    for problem in check_sample(key, fields):
        report.problem(f"CORRUPT {url} sample {key}: {problem}")
    if key in report.keys:
        report.problem(f"DUPLICATE key {key} in {url} and {report.keys[key]}")
    report.keys[key] = url
    report.images += any(media_kind(ext) == "image" for ext in fields)
    report.videos += any(media_kind(ext) == "video" for ext in fields)
    return 1


def load_manifest(folder, report):
    """manifest.json of a shard folder (None with a problem if absent), cross-checked with sizes.json."""
    manifest = shard_format.read_manifest_file(folder)
    if manifest is None:
        report.problem(f"NO MANIFEST {folder}/{MANIFEST}")
        return None
    sizes = shard_format.read_sizes_file(folder)
    if sizes is None:
        report.problem(f"NO SIZES {folder}/{SIZES}")
        sizes = {}
    for name, count in shard_format.sizes_of(manifest).items():
        if name in sizes and sizes[name] != count:
            report.problem(f"SIZES {folder}/{name}: {SIZES} says {sizes[name]}, manifest {count}")
    return manifest


def shard_urls(spec):
    """Brace-expanded shard URLs; a folder stands for every shard its manifest lists."""
    if spec.endswith(".tar") or "{" in spec:
        return list(braceexpand(spec))
    folder = spec.rstrip("/")
    manifest = shard_format.read_manifest_file(folder)
    if manifest is None:
        raise FileNotFoundError(shard_format.join(folder, MANIFEST))
    return [shard_format.join(folder, name) for name in manifest["shards"]]


def verify(spec):
    """Check every shard of `spec`; returns a Report (empty `problems` means all good)."""
    report = Report()
    manifests = {}
    try:
        urls = shard_urls(spec)
    except FileNotFoundError:
        report.problem(f"NO MANIFEST {spec.rstrip('/')}/{MANIFEST}")
        return report
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in manifests:
            manifests[folder] = load_manifest(folder, report)
        if not storage.exists(url):
            report.problem(f"MISSING {url}")
            continue
        found = read_shard(url, report)
        report.shards += 1
        if found is None:
            continue
        count, size, digest, texts = found
        report.samples += count
        manifest = manifests[folder]
        if manifest is None:
            continue
        entry = manifest["shards"].get(name)
        if entry is None:
            report.problem(f"UNLISTED {url}: not in {MANIFEST}")
            continue
        if count != entry["count"]:
            report.problem(f"COUNT {url}: {count} samples, manifest says {entry['count']}")
        for field in shard_format.TEXT_FIELDS:
            if field in entry and texts[field] != entry[field]:
                report.problem(f"COUNT {url}: {texts[field]} {field}, manifest says {entry[field]}")
        if size != entry["bytes"]:
            report.problem(f"SIZE {url}: {size} bytes, manifest says {entry['bytes']}")
        if digest != entry["sha256"]:
            report.problem(f"CHECKSUM {url}: sha256 differs from manifest")
    return report

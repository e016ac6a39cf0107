"""Read every shard, decode every sample and check it all against the manifest next to the shards."""

import hashlib
import json
import tarfile

from braceexpand import braceexpand

from aurora_ds.data import storage

from .media import IMAGE_EXTS, VIDEO_EXTS, decode_media


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


def split_name(name):
    """(key, extension) the way webdataset splits: at the first dot of the base name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (head + "/" if head else "") + stem, ext.lower()


def check_sample(key, fields):
    """Problems with one sample: its json must parse and carry text, its media must decode."""
    problems = []
    media = [ext for ext in fields if ext in IMAGE_EXTS or ext in VIDEO_EXTS]
    if not media:
        problems.append("no image/video field")
    if "json" not in fields:
        problems.append("no json field")
    else:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
            if not (meta.get("captions") or meta.get("questions")):
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


def read_shard(url, report):
    """Decode every sample of one shard; returns (count, bytes, sha256) or None if unreadable."""
    count = 0
    with storage.open_url(url, "rb") as f:
        reader = HashingReader(f)
        current, fields = None, {}
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = split_name(member.name)
                    if key != current and current is not None:
                        count += check_and_count(url, current, fields, report)
                        fields = {}
                    current = key
                    fields[ext] = tar.extractfile(member).read()
            if current is not None:
                count += check_and_count(url, current, fields, report)
            reader.drain()
        except (tarfile.TarError, EOFError, OSError) as exn:
            report.problem(f"TRUNCATED {url}: {type(exn).__name__}: {exn} (after {count} complete samples)")
            return None
    return count, reader.bytes, reader.digest.hexdigest()


def check_and_count(url, key, fields, report):
    for problem in check_sample(key, fields):
        report.problem(f"CORRUPT {url} sample {key}: {problem}")
    if key in report.keys:
        report.problem(f"DUPLICATE key {key} in {url} and {report.keys[key]}")
    report.keys[key] = url
    report.images += any(ext in IMAGE_EXTS for ext in fields)
    report.videos += any(ext in VIDEO_EXTS for ext in fields)
    return 1


def load_manifest(folder, report):
    """manifest.json of a shard folder (None with a problem if absent), cross-checked with sizes.json."""
    try:
        manifest = json.loads(storage.read_bytes(folder + "/manifest.json"))
    except FileNotFoundError:
        report.problem(f"NO MANIFEST {folder}/manifest.json")
        return None
    try:
        sizes = json.loads(storage.read_bytes(folder + "/sizes.json"))
    except FileNotFoundError:
        report.problem(f"NO SIZES {folder}/sizes.json")
        sizes = {}
    for name, entry in manifest["shards"].items():
        if name in sizes and sizes[name] != entry["count"]:
            report.problem(f"SIZES {folder}/{name}: sizes.json says {sizes[name]}, manifest {entry['count']}")
    return manifest


def shard_urls(spec):
    """Brace-expanded shard URLs; a folder stands for every shard its manifest lists."""
    if spec.endswith(".tar") or "{" in spec:
        return list(braceexpand(spec))
    folder = spec.rstrip("/")
    manifest = json.loads(storage.read_bytes(folder + "/manifest.json"))
    return [f"{folder}/{name}" for name in manifest["shards"]]


def verify(spec):
    """Check every shard of `spec`; returns a Report (empty `problems` means all good)."""
    report = Report()
    manifests = {}
    try:
        urls = shard_urls(spec)
    except FileNotFoundError:
        report.problem(f"NO MANIFEST {spec.rstrip('/')}/manifest.json")
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
        count, size, digest = found
        report.samples += count
        manifest = manifests[folder]
        if manifest is None:
            continue
        entry = manifest["shards"].get(name)
        if entry is None:
            report.problem(f"UNLISTED {url}: not in manifest.json")
            continue
        if count != entry["count"]:
            report.problem(f"COUNT {url}: {count} samples, manifest says {entry['count']}")
        if size != entry["bytes"]:
            report.problem(f"SIZE {url}: {size} bytes, manifest says {entry['bytes']}")
        if digest != entry["sha256"]:
            report.problem(f"CHECKSUM {url}: sha256 differs from manifest")
    return report

"""The shard contract: what ``shard_tools`` writes and the loader, the engine and the tests read.

Everything a writer and a reader of shards must agree on lives here and nowhere else, so the two
sides cannot drift apart (they once did: the converter stored BMP/GIF images that the loader then
skipped as ``missing_field``).

A shard is a tar file of samples. A sample is the tar members ``{key}.{ext}`` sharing a key (the
name up to the first dot of its base name, webdataset's rule):

- one media member, the original encoded bytes, its extension in ``IMAGE_EXTS`` or ``VIDEO_EXTS``
  (the formats the loader decodes);
- ``{key}.json``, the sample's metadata (``sample_meta``): ``id``, ``file`` (the source file,
  relative to the media root), ``dataset``, ``split`` and either ``captions`` (retrieval; DiDeMo
  also keeps its ``sentences``) or ``questions`` (QA; see ``question``).

Next to the shards: ``sizes.json`` (``{shard name: sample count}``, what OpenCLIP-style tools read)
and ``manifest.json`` (per shard ``count``, ``bytes``, ``sha256`` and the number of its
``captions`` or ``questions`` (``text_counts``: what steps per epoch are counted from); ``kind``,
``num_samples``, source, settings and input faults), both written by ``write_manifest``. QA splits
also get ``answers.json``: ``{answer: count}`` over the human answers of the split's annotations,
most frequent first (``write_answers``): the VQA answer list is built from it, never by streaming
the shards.

Depends on ``storage`` only (no torch), so shard tools and tests can use it alone.
"""

import json
import posixpath
import re
import tarfile
from collections import Counter

from . import storage
from .urls import expand_urls

KEY = "__key__"
JSON = "json"
# {ext: size} of a sample's members ``iter_tar_samples`` left unread as larger than its cap.
TOO_LARGE = "__too_large__"
# The loader's default cap on one member, in MB: far above any COCO/Flickr image or MSRVTT clip.
MAX_MEMBER_MB = 64.0

# Formats the loader decodes, in the order it looks for them in a sample.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv", "mov")
# Image formats the converter also reads; it stores them re-encoded as REENCODE_AS (lossless), so
# the shards only ever hold IMAGE_EXTS.
REENCODED_IMAGE_EXTS = ("bmp", "gif")
REENCODE_AS = "png"
# PIL's format name for writing each stored image extension.
PIL_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

SIZES = "sizes.json"
MANIFEST = "manifest.json"
ANSWERS = "answers.json"
# Per-shard manifest fields counting training pairs (``text_counts``).
TEXT_FIELDS = ("captions", "questions")

# webdataset's reader skips members named like __meta__ and so do we.
_META_NAME = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


# ---- media extensions -------------------------------------------------------------------------

def file_ext(path):
    """The lower-case extension of a file name, without the dot ("a/b.JPG" -> "jpg")."""
    return posixpath.splitext(path)[1].lstrip(".").lower()


def media_kind(ext):
    """"image" or "video" for an extension a shard may hold, else None."""
    if ext in IMAGE_EXTS:
        return "image"
    if ext in VIDEO_EXTS:
        return "video"
    return None


def media_field(sample, kind):
    """The extension of the sample's ``kind`` ("image"/"video") member, or None if it has none."""
    exts = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
    return next((e for e in exts if e in sample), None)


# ---- the json member --------------------------------------------------------------------------

def question(question_id, text, answers):
    """One entry of a QA sample's ``questions``: all human answers and their counts."""
    return {"question_id": question_id, "question": text, "answers": answers,
            "answer_counts": dict(Counter(answers))}


def sample_meta(id, file, dataset, split, captions=None, questions=None, sentences=None):
    """A sample's json: captions for retrieval, questions (``question``) for QA."""
    meta = {"id": id, "file": file, "dataset": dataset, "split": split}
    if questions is not None:
        meta["questions"] = questions
    else:
        meta["captions"] = captions
    if sentences:
        meta["sentences"] = sentences
    return meta


def encode_meta(meta):
    """The bytes of the json member (UTF-8, non-ASCII text kept as is)."""
    return json.dumps(meta, ensure_ascii=False).encode("utf-8")


def encode_sample(key, ext, data, meta):
    """The dict a webdataset TarWriter (``encoder=False``) writes as one sample."""
    return {KEY: key, ext: data, JSON: encode_meta(meta)}


def captions(meta):
    """The captions of a retrieval sample (KeyError if it has none: a wrong-kind sample)."""
    return meta["captions"]


def questions(meta):
    """The questions of a QA sample as (question_id, question, {answer: count}) (KeyError if none)."""
    return [(q["question_id"], q["question"], q.get("answer_counts") or dict(Counter(q.get("answers", []))))
            for q in meta["questions"]]


# ---- layouts the loader reads ----------------------------------------------------------------

AURORA = "aurora"  # this contract: media + {key}.json with captions or questions
IMG2DATASET = "img2dataset"  # img2dataset / video2dataset: media + {key}.txt [+ {key}.json, _stats.json]
TXT = "txt"


def sample_layout(sample, media, task):
    """The layout one sample fits, AURORA or IMG2DATASET, or None when it fits neither.

    Judged per sample, so that a damaged sample is skipped wherever it sits in its shard; the
    loader calls a shard unreadable only when none of its samples fits (``expected_layout``)."""
    if not any(e in sample for e in (IMAGE_EXTS if media == "image" else VIDEO_EXTS)):
        return None
    try:
        meta = json.loads(sample[JSON]) if JSON in sample else None
    except ValueError:  # UnicodeDecodeError is one
        meta = None
    if isinstance(meta, dict) and ("captions" if task == "retrieval" else "questions") in meta:
        return AURORA
    if task == "retrieval" and TXT in sample:
        return IMG2DATASET
    return None


def expected_layout(media, task):
    """The members a sample needs for ``task``, in words (for errors)."""
    exts = "|".join(IMAGE_EXTS if media == "image" else VIDEO_EXTS)
    field = "captions" if task == "retrieval" else "questions"
    return ("{key}.%s + {key}.json with %r (aurora-shard)" % (exts, field)
            + (", or {key}.%s + {key}.txt (img2dataset/video2dataset)" % exts if task == "retrieval" else ""))


def sample_members(sample):
    """The member extensions a sample holds, sorted, with the oversized ones (for errors)."""
    return sorted([k for k in sample if not k.startswith("__")] + list(sample.get(TOO_LARGE, {})))


def img2dataset_meta(sample):
    """An img2dataset sample's text and id in this contract's json form (``captions``, ``id``)."""
    caption = sample[TXT].decode("utf-8") if isinstance(sample[TXT], bytes) else str(sample[TXT])
    meta = {}
    if JSON in sample:
        try:
            meta = json.loads(sample[JSON]) or {}
        except ValueError:
            meta = {}
    key = meta.get("key") if isinstance(meta, dict) else None
    return {"id": str(key or sample[KEY]), "captions": [caption]}


def text_counts(meta):
    """``{"captions": n}`` or ``{"questions": n}``: a sample's training pairs for its shard's
    manifest entry (BLIP counts an epoch in captions, or questions, not in images)."""
    field = "questions" if "questions" in meta else "captions"
    return {field: len(meta.get(field) or [])}


def has_text(meta):
    """Whether the sample carries something to train on."""
    return bool(meta.get("captions") or meta.get("questions"))


def sample_texts(meta):
    """Every caption, question and answer of a sample (what a tokenizer is trained on)."""
    yield from meta.get("captions", [])
    for q in meta.get("questions", []):
        yield q["question"]
        yield from q.get("answers", [])


def answer_counts(meta):
    """{answer: count} over the sample's questions (empty for retrieval samples)."""
    counts = Counter()
    if "questions" in meta:
        for _, _, per_question in questions(meta):
            counts.update(per_question)
    return counts


# ---- reading tar shards -----------------------------------------------------------------------

def split_key(name):
    """(key, lower-case extension) of a member name, or (None, None) without an extension."""
    match = _KEY_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2).lower()


def iter_tar_samples(fileobj, fields=None, max_member_bytes=None):
    """The samples of a tar stream as ``{"__key__": key, ext: bytes, ...}``, in order.

    The one tar reader of the project (loader, verify, engine). Only regular members are read;
    with ``fields`` only those extensions are kept (the others are skipped without reading them
    into memory). A member larger than ``max_member_bytes`` is not read either (its size is in
    its header): the sample gets ``{TOO_LARGE: {ext: size}}`` instead, for the loader to skip it,
    so one huge member cannot grow a worker by its size. Read errors (truncated or corrupt tar)
    propagate.
    """
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        sample = None
        for member in tar:
            if not member.isreg() or _META_NAME.match(member.name):
                continue
            key, ext = split_key(member.name)
            if key is None:
                continue
            if sample is None or key != sample[KEY]:
                if sample is not None:
                    yield sample
                sample = {KEY: key}
            wanted = fields is None or ext in fields
            if wanted and max_member_bytes is not None and member.size > max_member_bytes:
                sample.setdefault(TOO_LARGE, {})[ext] = member.size
            elif wanted:
                sample[ext] = tar.extractfile(member).read()
            tar.members = []  # streaming: do not keep every member's header
        if sample is not None:
            yield sample


def iter_metas(spec, skip):
    """``(shard url, sample key, parsed json)`` of every sample of the shards of ``spec`` (media
    are not read). A json member that is not UTF-8 JSON is a sample fault, as in the loader:
    skipped after calling ``skip(url, key, "bad_json", detail)``."""
    for url in expand_urls(spec):
        with storage.open_url(url, "rb") as stream:
            for sample in iter_tar_samples(stream, fields=(JSON,)):
                if JSON in sample:
                    try:
                        meta = json.loads(sample[JSON].decode("utf-8"))
                    except ValueError as exn:  # UnicodeDecodeError is one
                        skip(url, sample[KEY], "bad_json", "%s: %s" % (type(exn).__name__, exn))
                        continue
                    yield url, sample[KEY], meta


# ---- sizes.json and manifest.json -------------------------------------------------------------

def join(folder, name):
    return folder.rstrip("/") + "/" + name if folder else name


def write_json(url, obj):
    """Stable, readable JSON (sorted keys), so identical input gives identical files."""
    storage.write_bytes(url, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def read_json(url):
    """The JSON document at ``url``, or None if there is none."""
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except OSError:
        if url.startswith(("http://", "https://")):  # curl -f exits 22 on a 404
            return None
        raise


def sizes_of(manifest):
    """{shard name: sample count}: the content of sizes.json."""
    return {name: entry["count"] for name, entry in manifest["shards"].items()}


def write_manifest(folder, manifest):
    """Write ``sizes.json`` and ``manifest.json`` next to the shards (sizes derived from the manifest)."""
    write_json(join(folder, SIZES), sizes_of(manifest))
    write_json(join(folder, MANIFEST), manifest)


def read_manifest_file(folder):
    """The folder's manifest.json, or None if absent."""
    return read_json(join(folder, MANIFEST))


def read_sizes_file(folder):
    """The folder's sizes.json, or None if absent."""
    return read_json(join(folder, SIZES))


def folder_entries(folder):
    """(kind, {shard name: manifest entry}) from manifest.json, else (None, {name: {"count"}})
    from sizes.json, else None."""
    manifest = read_manifest_file(folder)
    if manifest is not None:
        return manifest.get("kind"), manifest["shards"]
    sizes = read_sizes_file(folder)
    return None if sizes is None else (None, {name: {"count": n} for name, n in sizes.items()})


def _dirname(url):
    return posixpath.dirname(url) if "://" in url else posixpath.dirname(url) or "."


def read_manifest(spec):
    """Per-shard counts for the shards of ``spec``, from ``manifest.json`` or ``sizes.json``.

    Returns ``{"kind", "num_samples", "counts": {url: n}}`` summed over the shards of the spec
    (not the whole folder), plus ``"captions"`` and ``"questions"``: ``{url: n}`` when every shard's
    entry has that count, else None (sizes.json, or a manifest written before they were recorded).
    None when some shard has no count (``pipe:`` URLs, no manifest next to the shards, a shard
    missing from it). ``kind`` is None when only sizes.json was found.
    """
    counts, kinds, cache = {}, set(), {}
    texts = {field: {} for field in TEXT_FIELDS}
    for url in expand_urls(spec):
        if url.startswith("pipe:"):
            return None
        folder = _dirname(url)
        if folder not in cache:
            cache[folder] = folder_entries(folder)
            if cache[folder] is not None:
                kinds.add(cache[folder][0])
        found = cache[folder]
        name = posixpath.basename(url)
        if found is None or name not in found[1]:
            return None
        entry = found[1][name]
        counts[url] = int(entry["count"])
        for field in TEXT_FIELDS:
            if texts[field] is not None and field in entry:
                texts[field][url] = int(entry[field])
            else:
                texts[field] = None
    kinds.discard(None)
    if len(kinds) > 1:
        raise ValueError("spec %r mixes shard kinds %s" % (spec, sorted(kinds)))
    return {"kind": kinds.pop() if kinds else None, "num_samples": sum(counts.values()),
            "counts": counts, **texts}


# ---- answers.json: the answer counts of a QA split --------------------------------------------

def write_answers(folder, counts):
    """``answers.json`` next to a QA split's shards: ``{answer: count}``, most frequent first
    (ties by answer), so the answer list is the first N keys."""
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    storage.write_bytes(join(folder, ANSWERS), (json.dumps(ordered, ensure_ascii=False, indent=0) + "\n").encode("utf-8"))


def read_answers(spec):
    """The answer counts of the folders holding the shards of ``spec`` (summed over folders, in
    spec order). FileNotFoundError naming the missing ``answers.json``."""
    counts = Counter()
    for folder in dict.fromkeys(_dirname(url) for url in expand_urls(spec)):
        url = join(folder, ANSWERS)
        found = read_json(url)
        if found is None:
            raise FileNotFoundError(url)
        counts.update(found)
    return counts

"""URL specs and the manifests that sit next to the shards.

A spec is one or more brace patterns joined with ``::``, e.g.
``s3://bucket/coco-train-{000000..000127}.tar::/data/extra-{0..3}.tar``.
"""

import json
import logging
import posixpath

import braceexpand

from . import storage

log = logging.getLogger(__name__)


def expand_urls(spec):
    """A spec (string or list of strings) -> the list of shard URLs, in order."""
    parts = spec.split("::") if isinstance(spec, str) else list(spec)
    urls = []
    for part in parts:
        part = part.strip()
        if part:
            urls.extend(braceexpand.braceexpand(part))
    if not urls:
        raise ValueError("URL spec %r names no shards" % (spec,))
    return urls


def _dirname(url):
    return posixpath.dirname(url) if "://" in url else posixpath.dirname(url) or "."


def _join(directory, name):
    return directory + "/" + name if directory else name


def _read_json(url):
    try:
        return json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except OSError:
        if url.startswith(("http://", "https://")):  # curl -f exits 22 on a 404
            return None
        raise


def read_manifest(spec):
    """Per-shard sample counts for the shards of ``spec``, from ``manifest.json`` or ``sizes.json``.

    Returns ``{"kind", "num_samples", "counts": {url: n}}`` summed over the shards of the spec
    (not the whole directory), or None when some shard has no count (``pipe:`` URLs, no
    manifest next to the shards, a shard missing from it). ``kind`` is None when only
    sizes.json was found.
    """
    urls = expand_urls(spec)
    counts, kinds, cache = {}, set(), {}
    for url in urls:
        if url.startswith("pipe:"):
            return None
        directory = _dirname(url)
        if directory not in cache:
            manifest = _read_json(_join(directory, "manifest.json"))
            if manifest is not None:
                kinds.add(manifest.get("kind"))
                sizes = {name: entry["count"] for name, entry in manifest["shards"].items()}
            else:
                sizes = _read_json(_join(directory, "sizes.json"))
            cache[directory] = sizes
        sizes = cache[directory]
        name = posixpath.basename(url)
        if sizes is None or name not in sizes:
            return None
        counts[url] = int(sizes[name])
    kinds.discard(None)
    if len(kinds) > 1:
        raise ValueError("spec %r mixes shard kinds %s" % (spec, sorted(kinds)))
    return {"kind": kinds.pop() if kinds else None, "num_samples": sum(counts.values()),
            "counts": counts}

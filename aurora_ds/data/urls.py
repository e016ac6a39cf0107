"""URL specs: one or more brace patterns joined with ``::``.

For example ``s3://bucket/coco-train-{000000..000127}.tar::/data/extra-{0..3}.tar``. The manifests
that sit next to the shards are read by ``shard_format``.
"""

import braceexpand


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

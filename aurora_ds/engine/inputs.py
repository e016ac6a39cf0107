"""Every path and URL a run names, checked before anything expensive is built.

A missing shard, checkpoint, tokenizer, DeepSpeed config or answer list is an error naming the
config key and the path, found in seconds rather than after the backbone has been built and
partitioned. Every rank checks what it sees (nodes may have disks of their own), then all stop
together if any rank found a problem. Shards: a local file of the brace spec must exist and be a
non-empty tar; an ``s3://`` object must exist and be non-empty (one listing per folder, under the
storage timeouts, so an unreachable endpoint is an error naming it); ``http(s)://`` and ``pipe:``
URLs cannot be checked without reading them and are left to the loader.
"""

from __future__ import annotations

import os
import tarfile
from collections import defaultdict
from urllib.parse import urlparse


SHARD_KEYS = ("data.train_shards", "data.eval_shards", "data.test_shards")


def validate_inputs(cfg, world_size: int = 1) -> None:
    """Check every input of ``cfg`` on this rank (``setup.check_inputs``); collective: every rank
    stops if one failed."""
    from ..backbones import get_spec
    from .setup import check_inputs, on_every_rank

    on_every_rank(check_inputs, cfg, get_spec(cfg.backbone.name), world_size, {key: key for key in SHARD_KEYS})


def validate_eval_shards(spec: str) -> None:
    """``aurora-eval --shards``: the shards it reads."""
    from .setup import on_every_rank

    on_every_rank(check_shards, "--shards", spec)


def check_shards(key: str, spec: str):
    """Every shard of ``spec`` (the value of config key ``key``) is there and non-empty."""
    from ..data.storage import bucket_exists, is_s3, object_sizes, s3_settings
    from ..data.urls import expand_urls

    try:
        urls = expand_urls(spec)
    except ValueError as exn:
        raise ValueError(f"{key}={spec}: {exn}") from None
    folders = defaultdict(list)
    for url in urls:
        if is_s3(url):
            folders[url.rsplit("/", 1)[0]].append(url)
        elif urlparse(url).scheme in ("", "file"):
            _check_local_tar(key, urlparse(url).path if url.startswith("file:") else url)
    for folder, wanted in folders.items():
        try:
            sizes = object_sizes(folder)
        except OSError as exn:
            raise ValueError(f"{key}: cannot list the shards under {folder}: {exn}") from None
        missing = [u for u in wanted if u not in sizes]
        if missing and not sizes and not bucket_exists(folder):
            bucket = folder[len("s3://"):].split("/", 1)[0]
            raise FileNotFoundError(f"{key}={spec}: bucket {bucket!r} does not exist at the S3 endpoint "
                                    f"{s3_settings()['endpoint_url'] or 'of AWS'} (create it, or check the "
                                    "bucket name and AWS_ENDPOINT_URL)")
        if missing:
            raise FileNotFoundError(f"{key}: {len(missing)} of the {len(wanted)} shards under {folder} do not exist, "
                                    f"e.g. {', '.join(missing[:3])}")
        empty = [u for u in wanted if sizes[u] == 0]
        if empty:
            raise ValueError(f"{key}: shard {empty[0]} is empty ({len(empty)} empty shard(s) under {folder})")


def _check_local_tar(key: str, path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: shard {path} does not exist")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{key}: shard {path} is empty")
    if not tarfile.is_tarfile(path):
        raise ValueError(f"{key}: shard {path} is not a tar file")



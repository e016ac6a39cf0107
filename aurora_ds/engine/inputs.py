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

from ..dist import stop_if_any_rank_failed
from .data import read_answer_list

SHARD_KEYS = ("data.train_shards", "data.eval_shards", "data.test_shards")


def validate_inputs(cfg, world_size: int = 1) -> None:
    """Check every input of ``cfg`` on this rank; collective: every rank stops if one failed."""
    _on_every_rank(_check, cfg, world_size)


def validate_eval_shards(spec: str) -> None:
    """``aurora-eval --shards``: the one input it reads beyond what it checks as it loads."""
    _on_every_rank(check_shards, "--shards", spec)


def _on_every_rank(check, *args):
    try:
        problem = None
        check(*args)
    except (ValueError, OSError) as exn:
        problem = exn
    stop_if_any_rank_failed(problem, "checking the run's inputs")


def _check(cfg, world_size: int):
    if cfg.data.source == "shards":
        for key in SHARD_KEYS:
            spec = getattr(cfg.data, key.split(".")[1])
            if spec:
                check_shards(key, spec)
    if cfg.backbone.checkpoint:
        from ..backbones import backbone_config

        backbone_config(cfg.backbone.name, cfg.backbone.checkpoint)  # a directory with a readable config.json
    if cfg.backbone.tokenizer:
        from ..backbones.tokenizer import has_tokenizer

        if not os.path.isdir(cfg.backbone.tokenizer):
            raise FileNotFoundError(f"backbone.tokenizer={cfg.backbone.tokenizer}: tokenizer directory does not exist")
        if not has_tokenizer(cfg.backbone.tokenizer):
            raise FileNotFoundError(f"backbone.tokenizer={cfg.backbone.tokenizer}: no tokenizer.json or vocab.txt there")
    if cfg.eval.answer_list:
        read_answer_list(cfg.eval.answer_list, "eval.answer_list")
    if cfg.engine.deepspeed:
        from .dsconfig import build_ds_config

        try:
            build_ds_config(cfg.engine.ds_config, cfg, world_size)
        except (ValueError, OSError) as exn:
            raise type(exn)(f"engine.ds_config: {exn}") from None  # its message names the file


def check_shards(key: str, spec: str):
    """Every shard of ``spec`` (the value of config key ``key``) is there and non-empty."""
    from ..data.storage import is_s3, object_sizes
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



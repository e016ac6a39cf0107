"""Data: URL specs, object storage, WebDataset pipelines, image/video decoding, transforms, batching.

Depends on nothing else of aurora_ds, so shard tools and benchmarks can use it alone.
"""

from . import storage  # noqa: F401  (registers the s3/http openers in webdataset's gopen table)
from .loader import DataShortfallError, EmptyEpochError, LoaderConfig, ShardError, build_loader
from .seaweed import SeaweedServer
from .text import pre_caption, pre_question
from .shard_format import read_manifest
from .urls import expand_urls

__all__ = ["DataShortfallError", "EmptyEpochError", "LoaderConfig", "SeaweedServer", "ShardError", "build_loader",
           "expand_urls", "pre_caption", "pre_question", "read_manifest"]

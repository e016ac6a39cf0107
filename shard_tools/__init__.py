"""Dataset -> WebDataset tar shards (+ sizes.json, manifest.json), shard verification, sample data.

See docs/data.md; the CLI is ``aurora-shard`` (shard_tools.cli).
"""

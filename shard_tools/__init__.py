"""Dataset -> WebDataset tar shards (+ sizes.json, manifest.json), shard verification, sample data.

See shard_tools/README_SECTION.md; the CLI is ``aurora-shard`` (shard_tools.cli).
"""

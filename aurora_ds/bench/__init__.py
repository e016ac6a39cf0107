"""Benchmarks behind ``aurora-bench SUBCOMMAND`` (see cli.py)."""

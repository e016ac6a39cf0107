"""``aurora-eval``: evaluate a saved adapter on evaluation shards (argument parsing only)."""

from __future__ import annotations

import argparse
import sys

from .engine.config import build_config, list_recipes


def main(argv=None):
    p = argparse.ArgumentParser(prog="aurora-eval", description="Evaluate an Aurora adapter.")
    p.add_argument("--recipe", default="", help=f"packaged recipe ({', '.join(list_recipes())}) or a YAML path")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json + adapter.safetensors)")
    p.add_argument("--shards", required=True, help="URL spec of the evaluation shards")
    p.add_argument("--out", default="runs/eval", help="where metrics (and QA result files) are written")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-deepspeed", action="store_true", help="evaluate in one process without DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    overrides = [*args.overrides, f"eval_shards={args.shards}", f"train_shards={args.shards}", f"out_dir={args.out}"]
    if args.no_deepspeed:
        overrides.append("deepspeed=false")
    try:
        cfg = build_config(args.recipe, overrides)
        from .engine.loop import evaluate

        evaluate(cfg, args.adapter)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"aurora-eval: {e}")


if __name__ == "__main__":
    main()

"""``aurora-train`` / ``python -m aurora_ds.train``: argument parsing only."""

from __future__ import annotations

import argparse
import os
import sys

from .dist import RanksFailed, fail_once
from .engine.config import build_config, list_recipes
from .engine.dsconfig import shipped_ds_configs


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="aurora-train", description="Train Aurora on a frozen backbone under DeepSpeed.")
    p.add_argument("--recipe", default="", help=f"packaged recipe ({', '.join(list_recipes())}) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value (repeatable), e.g. --set optim.lr=1e-4 --set aurora.rank=16 "
                        "--set 'aurora.ranks={1408: 64}'; unknown keys are refused with the known ones listed")
    p.add_argument("--train-shards", help="URL spec of the training shards (same as --set data.train_shards=...)")
    p.add_argument("--eval-shards", help="URL spec of the validation shards (periodic evaluation, adapter_best)")
    p.add_argument("--test-shards", help="URL spec of the test shards (the chosen adapter, evaluated after training)")
    p.add_argument("--out", help="output directory (same as --set output.dir=...)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--resume", help="'auto' (newest complete checkpoint in --out) or a checkpoint directory")
    p.add_argument("--ds-config", help=f"auto (the layout aurora-plan recommends), a shipped config ({', '.join(sorted(shipped_ds_configs()))}) "
                        "or the path of a DeepSpeed JSON")
    p.add_argument("--no-deepspeed", action="store_true", help="single-process reference path without DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args):
    extra = {"data.train_shards": args.train_shards, "data.eval_shards": args.eval_shards,
             "data.test_shards": args.test_shards, "output.dir": args.out,
             "optim.max_steps": args.max_steps, "output.resume": args.resume, "engine.ds_config": args.ds_config}
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in extra.items() if v is not None]
    if args.no_deepspeed:
        overrides.append("engine.deepspeed=false")
    return build_config(args.recipe, overrides)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"aurora-train: {e}")
    if not args.recipe and os.environ.get("RANK", "0") == "0":
        # Without a recipe nothing says which backbone a checkpoint is or which settings fit it.
        print(f"[aurora] no --recipe: every key not given takes its default (backbone.name="
              f"{cfg.backbone.name}, optim.lr={cfg.optim.lr}, optim.epochs={cfg.optim.epochs}; "
              "docs/training.md); --recipe coco_retrieval etc. gives the paper's settings", file=sys.stderr)
    from .engine.loop import train

    try:
        train(cfg)
    except (ValueError, FileNotFoundError, RanksFailed) as e:
        fail_once("aurora-train", e)


if __name__ == "__main__":
    main()

"""``aurora-eval``: evaluate a saved adapter, or the frozen checkpoint (``--zero-shot``), on
evaluation shards (argument parsing only).

Its own keys are the options below (``EvalRunConfig``); everything else comes from the adapter,
which records its run (an adapter without that record needs ``--recipe``), with ``--recipe`` and
``--set`` on top.
"""

from __future__ import annotations

import argparse

from .backbones import PRECISIONS
from .dist import RanksFailed, fail_once
from .engine.config import EvalRunConfig, list_recipes
from .engine.dsconfig import shipped_ds_configs


def parse_args(argv=None) -> EvalRunConfig:
    p = argparse.ArgumentParser(prog="aurora-eval", description="Evaluate an Aurora adapter.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--adapter", help="adapter directory (adapter_config.json + adapter.safetensors)")
    what.add_argument("--zero-shot", action="store_true",
                      help="evaluate the frozen checkpoint of --recipe (Aurora's update is exactly zero before training)")
    p.add_argument("--shards", required=True, help="URL spec of the evaluation shards")
    p.add_argument("--out", default="runs/eval", help="where metrics (and QA result files) are written")
    p.add_argument("--batch-size", type=int, default=0, help="evaluation batch size (default: the run's eval.batch_size)")
    p.add_argument("--k-test", type=int, default=0, help="retrieval candidates re-ranked per query (default: the run's)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="", help="default: the run's engine.precision")
    p.add_argument("--ds-config", default="", help=f"a shipped config ({', '.join(sorted(shipped_ds_configs()))}) or the path of a DeepSpeed JSON "
                        "(default: the run's)")
    p.add_argument("--no-deepspeed", action="store_true", help="evaluate in one process without DeepSpeed")
    p.add_argument("--recipe", default="", help=f"packaged recipe ({', '.join(list_recipes())}) or a YAML path, "
                   "on top of the run configuration the adapter records (needed for an adapter without one)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a run configuration value (repeatable), e.g. --set backbone.checkpoint=DIR")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return EvalRunConfig(adapter=args.adapter or "", shards=args.shards, out=args.out, batch_size=args.batch_size,
                         k_test=args.k_test, precision=args.precision, deepspeed=not args.no_deepspeed,
                         ds_config=args.ds_config, recipe=args.recipe, overrides=args.overrides)


def main(argv=None):
    eval_cfg = parse_args(argv)
    try:
        cfg = eval_cfg.run_config()
        from .engine.loop import evaluate

        evaluate(cfg, eval_cfg.adapter or None)
    except (ValueError, FileNotFoundError, RanksFailed) as e:
        fail_once("aurora-eval", e)


if __name__ == "__main__":
    main()

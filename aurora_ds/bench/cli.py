"""aurora-bench: throughput benchmarks, one subcommand per module.

A benchmark module defines ``add_arguments(parser)`` and ``run(args) -> exit code`` and keeps its
heavy imports inside ``run``; adding one is one line in COMMANDS.
"""

import argparse
import importlib
import sys

COMMANDS = {
    "data": ("aurora_ds.bench.data", "loader samples/s in steady state (local vs S3 interleaved, per worker count) and shard writing"),
    "step": ("aurora_ds.bench.step", "step time and peak memory: Aurora vs frozen floor, LoRA, full fine-tuning"),
    "zero": ("aurora_ds.bench.zero", "ZeRO-3 parameter memory and step time, 1 vs 2 ranks (+ offload), plan estimates"),
    "gather-fit": ("aurora_ds.bench.gather_fit", "aurora-plan's ZeRO-3 communication constants fitted to zero reports, "
                                                 "each checked with a fit to the others"),
    "load": ("aurora_ds.bench.load", "loading a checkpoint per layout on N ranks: seconds, bytes read, peak host "
                                      "memory per rank against aurora-plan (--write: a random hub-layout checkpoint)"),
    "quality": ("aurora_ds.bench.quality", "compositional retrieval under a held-out shift: Aurora vs LoRA vs full"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="aurora-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=mod.__doc__)
        mod.add_arguments(p)
        p.set_defaults(run=mod.run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

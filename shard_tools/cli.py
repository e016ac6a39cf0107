"""aurora-shard: convert datasets to WebDataset shards, verify shards, write sample datasets."""

import argparse
import sys

from .annotations import KINDS


def cmd_convert(args):
    from .convert import ConvertError, convert

    try:
        convert(args.dataset, args.ann, args.media_root, args.split, args.out, workers=args.workers,
                maxcount=args.maxcount, maxsize=args.maxsize, resize=args.resize, strict=args.strict)
    except (ConvertError, FileNotFoundError) as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 1
    return 0


def cmd_verify(args):
    from .verify import verify

    report = verify(args.spec)
    for line in report.problems:
        print(line)
    status = "FAILED" if report.problems else "OK"
    print(f"{status}: {report.shards} shard(s), {report.samples} samples ({report.images} images, "
          f"{report.videos} videos), {len(report.problems)} problem(s)")
    return 1 if report.problems else 0


def cmd_sample(args):
    from .sample import MAKERS

    MAKERS[args.dataset](args.out, args.n, args.seed)
    print(f"wrote a {args.dataset} sample of {args.n} items to {args.out}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="aurora-shard", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="annotations + media -> tar shards + sizes.json + manifest.json")
    p.add_argument("dataset", choices=sorted(KINDS))
    p.add_argument("--ann", action="append", required=True,
                   help="annotation file; repeat for datasets that need several (VQAv2 questions + answers)")
    p.add_argument("--media-root", required=True, help="folder the annotation's image/video paths are relative to")
    p.add_argument("--split", required=True, help="split to select (Karpathy/MSRVTT files) and to name the shards")
    p.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    p.add_argument("--workers", type=int, default=1, help="processes reading and checking media")
    p.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    p.add_argument("--maxsize", type=int, default=3 * 10**9, help="payload bytes per shard at most")
    p.add_argument("--resize", type=int, default=None,
                   help="re-encode media with the shorter side at most N pixels (default: original bytes)")
    p.add_argument("--strict", action="store_true", help="exit non-zero on any input fault, before writing")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="decode every sample and check shards against the manifest")
    p.add_argument("spec", help="brace-expanded shard URLs (local or s3://), or the shard folder")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sample", help="write a small synthetic dataset in the official layout")
    p.add_argument("dataset", choices=sorted(KINDS))
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=20, help="number of images/videos")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample)
    return parser


def _user_errors():
    """Errors that come from the input or the storage, not from a bug."""
    errors = [OSError, ValueError, KeyError, TypeError, RuntimeError, UnicodeError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(errors)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as exn:  # one line, not a traceback: these are input and storage problems
        detail = str(exn).strip().splitlines()[0] if str(exn).strip() else ""
        print(f"aurora-shard {args.command}: error: {type(exn).__name__}: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

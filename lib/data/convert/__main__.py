"""``python -m lib.data.convert DATASET [--src RAW] [--out PREPARED] [--workers N] [--shard I/N] [--limit K]``."""

from __future__ import annotations

import argparse
import json
import sys

from lib.data import convert, locate


def _parser(name: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib.data.convert", description=convert.__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=convert.names())
    parser.add_argument("--src", help="the raw download (default: <data root>/raw/DATASET, else found under /kaggle/input)")
    parser.add_argument("--out", help="the prepared dataset folder (default: <data root>/prepared/DATASET)")
    parser.add_argument("--workers", type=int, default=1, help="conversion processes (default 1)")
    parser.add_argument("--shard", help="I/N: convert only this machine's share (1..N) of the items")
    parser.add_argument("--limit", type=int, help="convert at most K items (of this shard)")
    parser.add_argument("--merge-only", action="store_true", help="only rebuild the top-level tables from parts/")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_common_arguments(parser)
    if name in convert.names():
        convert.get(name).add_arguments(parser.add_argument_group(f"{name} options"))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(name).parse_args(argv)
    module = convert.get(args.dataset)
    out = args.out or str(locate.prepared_dir(args.dataset))
    if args.merge_only:
        print(json.dumps(convert.merge(out)))
        return 0
    src = args.src
    if src is None:
        found = locate.find_raw(args.dataset, getattr(module, "MARKER", None))
        if not found:
            print(f"error: no raw {args.dataset} download found under {locate.raw_dir(args.dataset)} or the Kaggle "
                  f"input root; pass --src (get it with: python -m lib.data.manifest fetch {args.dataset})", file=sys.stderr)
            return 2
        src = str(found[0])
    if args.workers < 1 or (args.limit is not None and args.limit < 1) or (args.spacing is not None and not args.spacing > 0):
        print("error: --workers and --limit must be >= 1, --spacing > 0", file=sys.stderr)
        return 2
    options = {k: v for k, v in vars(args).items() if k in convert.defaults(module)}
    try:
        summary = convert.run(args.dataset, src, out, workers=args.workers, shard=args.shard, limit=args.limit,
                              options=options, progress=not args.quiet)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``acamkd`` command line: parse, build, call. Subcommands live in their own modules."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acamkd", description="ACAM-KD knowledge distillation for dense prediction")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser("bench", help="speed and memory benchmarks")
    bench_targets = bench.add_subparsers(dest="target", metavar="TARGET", required=True)
    from acamkd.bench import acam as bench_acam

    bench_acam.build_parser(bench_targets.add_parser(
        "acam", help="ACAM-KD fast path vs the SDPA floor and the materialised reference",
        description=bench_acam.__doc__.splitlines()[0]))

    make_data = commands.add_parser(
        "make-data", help="write a built-in dataset to disk (COCO and Cityscapes layouts)",
        description="Write a built-in dataset. `acamkd make-data shapes --help` lists its options.")
    make_data.add_argument("dataset", choices=("shapes",), help="which built-in dataset")
    make_data.add_argument("options", nargs=argparse.REMAINDER, help="options of that dataset's generator")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from acamkd import __version__

        print(__version__)
        return 0
    if args.command == "bench" and args.target == "acam":
        from acamkd.bench import acam as bench_acam

        return bench_acam.main(args=args)
    if args.command == "make-data":
        from acamkd.data import synthetic

        return synthetic.main(args.options)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

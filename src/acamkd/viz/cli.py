"""``acamkd viz TARGET``: the ``masks`` and ``history`` subcommands (their logic lives in
:mod:`acamkd.viz.masks` and :mod:`acamkd.viz.history`)."""
from __future__ import annotations

import argparse

__all__ = ["build_parser", "main"]


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from acamkd.viz import history, masks

    targets = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    masks.build_parser(targets.add_parser(
        "masks", help="per image: input, teacher/student energy, the method's masks (PNG)",
        description=masks.__doc__.splitlines()[0]))
    history.build_parser(targets.add_parser(
        "history", help="training curves of one or more runs from metrics.jsonl, overlaid (PNG)",
        description=history.__doc__.splitlines()[0]))
    return parser


def main(args: argparse.Namespace) -> int:
    from acamkd.viz import history, masks

    return {"masks": masks, "history": history}[args.target].main(args=args)

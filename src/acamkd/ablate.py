"""``acamkd ablate``: the ablations of ACAM-KD (the paper's Tables 8-10 and ours) on the compare runner.

``acamkd ablate CONFIG [--set rows|sweeps] [--seeds N] [--out DIR] [--with METHOD:key=value ...]
[--teacher-override KEY=VALUE | --teacher-checkpoint PATH] [--report-only] [overrides...]``

CONFIG is an ACAM-KD distillation config (``method.name: acam``). Every row is a run set of
:mod:`acamkd.compare` (one shared teacher, the same schedule, seeds 0..N-1, cached and resumable,
one table, mean ± std); this module only decides the rows, and adds a legend saying what each is.

* ``--set rows`` (:data:`ABLATION_ROWS`, ``../shared/spec/baselines.md``, "The ablation rows"):
  no mask (the plain student), cooperative (ACAM-KD with CONFIG's options), spatial only,
  channel only, student query, uniform mask (``mask_source=uniform``: aligned MSE under ACAM's
  normalisation), teacher-only adaptive mask (``mask_source=teacher``), teacher offline fixed
  mask (``maskd``: MasKD's tokens learned in stage 1 on the teacher, then frozen). Each ACAM-KD row
  changes one option of CONFIG's and keeps the others (the default mode's switches included).
* ``--set sweeps`` (:data:`SWEEPS`): CONFIG's ACAM-KD, then one row per other value of M (3, 6,
  12), alpha and lambda (0.5, 1, 2), the channel-mask form (paper, elementwise, article) and
  ``mask_norm`` (mass, energy). A value equal to CONFIG's own is the ``acam`` row, not run twice.

``--with METHOD:key=value`` (repeatable) adds method options to every row of another method than
CONFIG's, e.g. ``--with maskd:token_iterations=200`` (MasKD's stage 1 runs 2,000 iterations by
default); CONFIG's own method takes its options as overrides (``method.options.num_masks=6``).
An ACAM-KD row equal to CONFIG's own options (e.g. ``masks=spatial`` in a spatial-only config) is
the ``acam`` row, not run twice; a config with ``mask_source`` other than cooperative is refused.
Out: compare's ``<out>/results.md`` (the table, then the legend) and ``results.json``; default
``runs/ablate/<config stem>-<set>``.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["ABLATION_ROWS", "SWEEPS", "ablation_rows", "build_parser", "legend", "main"]

ACAM = "acam"

#: (row: a method name or a compare variant ``NAME:key=value``, what it is). Paper numbers:
#: Table 10, RetinaNet R101 -> R50 on COCO (box mAP).
ABLATION_ROWS: tuple[tuple[str, str], ...] = (
    ("plain", "no mask: the student without distillation (the paper's 37.4 equals its student baseline)"),
    (ACAM, "cooperative: full ACAM-KD, CONFIG's options (paper 41.2)"),
    ("acam:masks=spatial", "spatial masks only (Table 8)"),
    ("acam:masks=channel", "channel masks only (Table 8)"),
    ("acam:query=student", "the student asks in STCA-FF instead of the teacher (Table 9)"),
    ("acam:mask_source=uniform", "uniform mask (ours): every mask 1, so aligned MSE under ACAM's normalisation; "
                                 "isolates what the masks add"),
    ("acam:mask_source=teacher", "teacher-only adaptive mask: masks from the teacher feature alone, learned online, "
                                 "no STCA-FF (paper 39.9)"),
    ("maskd", "teacher offline fixed mask: MasKD's receptive tokens learned in stage 1 on the teacher, frozen "
              "(paper 39.8; MasKD's own loss)"),
)

#: ACAM-KD option -> the values swept (spec: M in {3, 6, 12}, alpha and lambda in {0.5, 1, 2}, the
#: three channel-mask forms, mass vs energy normalisation).
SWEEPS: dict[str, tuple[Any, ...]] = {
    "num_masks": (3, 6, 12),
    "alpha": (0.5, 1.0, 2.0),
    "lam": (0.5, 1.0, 2.0),
    "channel_mask": ("paper", "elementwise", "article"),
    "mask_norm": ("mass", "energy"),
}


def _with_options(row: str, extra: Mapping[str, list[str]]) -> str:
    """``row`` with the ``--with`` options of its method appended (``maskd`` -> ``maskd:k=v``)."""
    name, _, rest = row.partition(":")
    added = extra.get(name, [])
    if not added:
        return row
    return f"{name}:{shlex.join([*shlex.split(rest), *added])}"


def ablation_rows(kind: str, acam_options: Mapping[str, Any],
                  extra: Mapping[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """The ``(row, what it is)`` pairs of ``kind`` ("rows" or "sweeps") in table order, for a
    config whose resolved ACAM-KD options are ``acam_options``; ``extra`` maps another method's
    name to ``key=value`` options added to its rows. Raises ValueError for an unknown ``kind``."""
    extra = extra or {}
    if kind == "rows":
        rows = []
        for row, what in ABLATION_ROWS:
            key, _, value = row.partition(":")[2].partition("=")
            if row.startswith(f"{ACAM}:") and str(acam_options[key]) == value:
                continue  # CONFIG already has it: that is the acam row
            if row == ACAM:
                what += f"; masks={acam_options['masks']}, query={acam_options['query']}"
            rows.append((_with_options(row, extra), what))
        return rows
    if kind != "sweeps":
        raise ValueError(f"--set must be 'rows' or 'sweeps', got {kind!r}")
    rows = [(ACAM, "ACAM-KD with CONFIG's options: " + ", ".join(f"{k}={acam_options[k]}" for k in SWEEPS))]
    for key, values in SWEEPS.items():
        for value in values:
            if value != acam_options[key]:  # CONFIG's own value is the acam row
                rows.append((f"acam:{key}={value}", f"sweep of {key}: {value} (CONFIG: {acam_options[key]})"))
    return rows


def legend(rows: Sequence[tuple[str, str]]) -> str:
    """A markdown table: each row's name in the results table, and what it is."""
    from acamkd.compare import PLAIN, parse_variant

    lines = ["| row | what it is |", "|---|---|"]
    for row, what in rows:
        name = parse_variant(row).name if ":" in row else row
        lines.append(f"| {name if row != PLAIN else PLAIN} | {what} |")
    return "\n".join(lines)


def _parse_with(items: Sequence[str], own: str) -> dict[str, list[str]]:
    from acamkd.compare import PLAIN, parse_variant

    extra: dict[str, list[str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        if not sep or not rest.strip():
            raise ValueError(f"--with {item!r}: expected METHOD:key=value, e.g. --with maskd:token_iterations=200")
        if name.strip() == PLAIN:
            raise ValueError(f"--with {item!r}: the {PLAIN!r} row has no method options")
        if name.strip() == own:
            raise ValueError(f"--with {item!r}: {own!r} rows take no --with options (CONFIG's own method takes "
                             f"its options as overrides, e.g. method.options.{rest.split('=')[0].strip()}=...)")
        parse_variant(item)  # checks the method name and each key=value
        extra.setdefault(name.strip(), []).extend(shlex.split(rest))
    return extra


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    from acamkd.compare import add_run_set_arguments

    parser = parser or argparse.ArgumentParser(prog="acamkd ablate", description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="ablation_set", choices=("rows", "sweeps"), default="rows",
                        help="rows: the paper's ablation rows and ours; sweeps: M, alpha, lambda, channel-mask "
                             "form, mask_norm (default rows)")
    parser.add_argument("--with", dest="with_options", action="append", default=[], metavar="METHOD:KEY=VALUE",
                        help="options added to every row of another method than CONFIG's, e.g. "
                             "maskd:token_iterations=200; repeatable")
    return add_run_set_arguments(parser, "runs/ablate/<config stem>-<set>")


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """Decide the rows, run them with :func:`acamkd.compare.main`, append the legend."""
    from acamkd import compare
    from acamkd.config import load_config

    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, list(args.overrides))
    if cfg.method.name != ACAM:
        raise ValueError(f"acamkd ablate: {args.config} distils with {cfg.method.name!r}; the ablations are of "
                         f"ACAM-KD: give a config with method.name: {ACAM} (e.g. configs/demo/shapes_det_acam.yaml)")
    if cfg.method.options["mask_source"] != "cooperative":
        raise ValueError(f"acamkd ablate: {args.config} has method.options.mask_source="
                         f"{cfg.method.options['mask_source']!r}; the rows ablate the cooperative masks: give "
                         f"mask_source=cooperative (the teacher and uniform sources are rows of their own)")
    rows = ablation_rows(args.ablation_set, cfg.method.options, _parse_with(args.with_options, ACAM))
    methods = [row for row, _ in rows if ":" not in row]
    variants = [row for row, _ in rows if ":" in row]
    out = Path(args.out or Path("runs") / "ablate" / f"{Path(args.config).stem}-{args.ablation_set}")
    run_args = argparse.Namespace(**{**vars(args), "methods": ",".join(methods), "variants": variants,
                                     "out": str(out)})
    code = compare.main(args=run_args)
    md = out / "results.md"
    text = f"\nWhat each row is (`acamkd ablate --set {args.ablation_set}`):\n\n{legend(rows)}\n"
    md.write_text(md.read_text() + text)
    print(text)
    return code


if __name__ == "__main__":
    sys.exit(main())

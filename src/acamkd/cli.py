"""The ``acamkd`` command line: parse, build, call. Subcommands live in their own modules."""
from __future__ import annotations

import argparse
import os
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
    from acamkd.bench import distill as bench_distill

    bench_distill.build_parser(bench_targets.add_parser(
        "distill", help="distillation step vs student step + teacher forward (images/s, peak memory)",
        description=bench_distill.__doc__.splitlines()[0]))

    for name, help_text in (("train", "train a model (a teacher, or a student without distillation)"),
                            ("distill", "distil a student from a trained teacher (teacher.checkpoint)"),
                            ("eval", "evaluate a checkpoint's student and print the metrics as JSON"),
                            ("export", "write a checkpoint's student weights (only) as safetensors")):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("config", help="YAML config (see configs/)")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=2 data.root=/data/coco")
        if name in ("train", "distill"):
            mode = sub.add_mutually_exclusive_group()
            mode.add_argument("--resume", action="store_true",
                              help="continue the run in train.output_dir from its last checkpoint")
            mode.add_argument("--overwrite", action="store_true",
                              help="delete the run already in train.output_dir and start over")
        if name == "distill":
            sub.add_argument("--no-eval-teacher", dest="eval_teacher", action="store_false", default=None,
                             help="skip evaluating the teacher before distilling")
        if name in ("eval", "export"):
            sub.add_argument("--checkpoint", required=True, help="a checkpoint written by train/distill")
        if name == "export":
            sub.add_argument("--out", required=True, help="output .safetensors file")

    from acamkd import demo

    demo.build_parser(commands.add_parser("demo", help="teacher, student and student + ACAM-KD on the built-in "
                                                       "dataset, one table", description=demo.__doc__.splitlines()[0]))

    from acamkd import compare

    compare.build_parser(commands.add_parser("compare", help="one distillation config, several methods (and "
                                                             "variants, seeds), one table",
                                             description=compare.__doc__.splitlines()[0]))

    from acamkd import ablate

    ablate.build_parser(commands.add_parser("ablate", help="ACAM-KD's ablation rows or sweeps on the compare "
                                                           "runner, one table", description=ablate.__doc__.splitlines()[0]))

    from acamkd import cost
    from acamkd.viz import cli as viz_cli

    viz_cli.build_parser(commands.add_parser("viz", help="pictures: a method's masks per image, runs' training "
                                                         "curves", description="PNG pictures of distillation"))
    cost.build_parser(commands.add_parser("cost", help="measured cost of distilling and deploying a config's "
                                                       "models, one table", description=cost.__doc__.splitlines()[0]))

    from acamkd.engine import maskd_tokens

    maskd_tokens.build_parser(commands.add_parser(
        "maskd-tokens", help="MasKD stage 1: learn the receptive tokens on the frozen teacher, write them to a file",
        description=maskd_tokens.__doc__.splitlines()[0]))

    make_data = commands.add_parser(
        "make-data", help="write a built-in dataset to disk (COCO and Cityscapes layouts)",
        description="Write a built-in dataset. `acamkd make-data shapes --help` lists its options.")
    make_data.add_argument("dataset", choices=("shapes",), help="which built-in dataset")
    make_data.add_argument("options", nargs=argparse.REMAINDER, help="options of that dataset's generator")
    return parser


def _run_job(args: argparse.Namespace) -> int:
    import json
    import logging

    from acamkd.config import load_config
    from acamkd.engine import run

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        result = run.train(cfg, resume=args.resume, overwrite=args.overwrite)
    elif args.command == "distill":
        result = run.distill(cfg, resume=args.resume, eval_teacher=args.eval_teacher, overwrite=args.overwrite)
    elif args.command == "eval":
        result = run.evaluate(cfg, args.checkpoint)
        from acamkd.evaluation import per_class_table

        table = per_class_table(result)  # per class, by name; stderr: stdout stays one JSON object
        if table and os.environ.get("RANK", "0") == "0":
            print(table, file=sys.stderr)
    else:
        names = run.export_student(cfg, args.checkpoint, args.out)
        result = {"out": args.out, "tensors": len(names)}
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result, indent=1))
    return 0


# Bad configs, files, checkpoints, disks and diverged losses: the message says what and where.
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError)


def _resume_command() -> str:
    """This command line with ``--resume`` (and without ``--overwrite``)."""
    import shlex

    argv = [a for a in sys.argv[1:] if a not in ("--resume", "--overwrite")]
    return " ".join(["acamkd", *map(shlex.quote, argv), "--resume"])


# Commands that run a set of training runs: the same command line continues them (finished runs
# are reused, the interrupted one resumes from its last checkpoint); they take no --resume.
_RUN_SET_COMMANDS = ("demo", "compare", "ablate")


def _continue_hint(command: str, checkpoint: str = "") -> str:
    """How to continue after a stop signal: ``--resume`` for one run, the same command for a run set
    or for a stop in MasKD's stage 1 (``checkpoint``: its ``<token file>.partial.pt`` or tokens)."""
    import shlex

    from acamkd.engine.checkpoint import LAST_NAME, PREV_NAME

    if command not in _RUN_SET_COMMANDS and checkpoint and os.path.basename(checkpoint) not in (LAST_NAME, PREV_NAME):
        # MasKD's stage 1 (its checkpoint or its finished tokens): the same command continues it;
        # --resume only where stage 2 has a checkpoint already
        folder = os.path.dirname(checkpoint)
        keep = any(os.path.isfile(os.path.join(folder, name)) for name in (LAST_NAME, PREV_NAME))
        again = " ".join(["acamkd", *map(shlex.quote, [a for a in sys.argv[1:] if keep or a != "--resume"])])
        return f"MasKD's stage 1 continues from it when the same command runs again:\n  {again}"
    if command in _RUN_SET_COMMANDS:
        again = " ".join(["acamkd", *map(shlex.quote, sys.argv[1:])])
        return (f"Run the same command again: finished runs are reused and the interrupted one resumes "
                f"from its last checkpoint:\n  {again}")
    return f"Resume with:\n  {_resume_command()}"


def _guarded(command: str, job) -> int:
    """Run ``job()``; a user error prints one named message (no traceback) and exits 1; a stop
    signal that saved a checkpoint prints how to resume and exits 128 + the signal number."""
    from acamkd.engine.trainer import TrainingInterrupted
    from acamkd.errors import user_message

    try:
        return job()
    except TrainingInterrupted as stop:
        print(f"acamkd {command}: {stop}. {_continue_hint(command, stop.checkpoint)}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print(f"acamkd {command}: interrupted before training started (nothing to save)", file=sys.stderr)
        return 130
    except _USER_ERRORS as err:
        if os.environ.get("ACAMKD_TRACEBACK"):
            raise
        print(f"acamkd {command}: {type(err).__name__}: {user_message(err)}\n"
              f"(set ACAMKD_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from acamkd import __version__

        print(__version__)
        return 0
    if args.command == "bench":
        from acamkd.bench import acam as bench_acam
        from acamkd.bench import distill as bench_distill

        bench = {"acam": bench_acam, "distill": bench_distill}[args.target]
        return _guarded(f"bench {args.target}", lambda: bench.main(args=args))
    if args.command in ("train", "distill", "eval", "export"):
        return _guarded(args.command, lambda: _run_job(args))
    if args.command == "demo":
        from acamkd import demo

        return _guarded("demo", lambda: demo.main(args=args))
    if args.command == "compare":
        from acamkd import compare

        return _guarded("compare", lambda: compare.main(args=args))
    if args.command == "ablate":
        from acamkd import ablate

        return _guarded("ablate", lambda: ablate.main(args=args))
    if args.command == "viz":
        from acamkd.viz import cli as viz_cli

        return _guarded(f"viz {args.target}", lambda: viz_cli.main(args))
    if args.command == "cost":
        from acamkd import cost

        return _guarded("cost", lambda: cost.main(args=args))
    if args.command == "maskd-tokens":
        from acamkd.engine import maskd_tokens

        return _guarded("maskd-tokens", lambda: maskd_tokens.main(args=args))
    if args.command == "make-data":
        from acamkd.data import synthetic

        return synthetic.main(args.options)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""``acamkd cost CONFIG [overrides]``: what distilling and deploying a config's models costs, measured.

Everything is built as the engine builds it (``engine/run.py``: ``build_task``, ``build_models``
from random initialisation, ``build_step``; speed and memory do not depend on the weights) and run
on random batches of the config's image size (``Task.random_batch``), with the timing rules of
``acamkd bench distill`` (:mod:`acamkd.bench.measure`: ``--warmup`` untimed calls, then the
median of ``--repeats`` synchronised calls; peak memory: CUDA allocated above what was held
before, CPU growth of the peak resident set; each measurement in its own process):

* training, per step of ``--batch`` images: the student alone (``train``), the teacher forward
  that distillation needs, and one distillation step for every registered method that applies
  (``--methods``; the config's own method with its options, the others with their defaults; a
  method that cannot run on this config is listed with the reason), each past its warm-up
  (the bench's steady state: MasKD with its student masks on);
* the parameters of each method's training-only modules (alignment convs, mask units), which
  the export drops;
* inference (eval mode, no grad, full forward with post-processing): images/s and peak memory at
  ``--batch``, parameters, and FLOPs of one image (``torch.utils.flop_counter.FlopCounterMode``;
  a multiply-add counts 2) of the teacher, the student and the exported distilled student: a
  distillation checkpoint (student + method) written and exported by ``acamkd export``'s code
  (``engine/run.py:export_student``), loaded strictly into a fresh student. Its FLOPs and
  parameters must equal the student's (``exported_equals_student`` in the JSON).

The export reads the validation set's class list (built-in ``shapes`` data is generated); without
the dataset on disk its row says why it was skipped. One table: markdown (stdout, or
``--out DIR``: ``DIR/cost.md`` and ``DIR/cost.json``) or ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import Any

__all__ = ["build_parser", "main", "cost_report", "inference_cost", "exported_student", "method_parameters",
           "default_spec", "markdown_table"]

ROLES = ("teacher", "student", "exported")


# ------------------------------------------------------------------------------------ defaults
def default_spec(cfg: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Image size, batch and class count of the measurement: the flags, else the config's
    (detection ``data.min_size x data.max_size``; segmentation ``data.crop``, else the built-in
    data's size, else 1024x2048; ``data.batch_size``; classes: ``student.num_classes``, else the
    validation set's when it is on disk or built in, else 80 / 19)."""
    from acamkd.bench.levels import parse_image_size

    d = cfg.data
    if args.image:
        image = list(parse_image_size(args.image))
    elif cfg.student.task == "detection":
        image = [d.min_size, d.max_size]
    else:
        image = list(d.crop or (d.shapes.size if d.dataset == "shapes" else [1024, 2048]))
    return {"image": image, "batch": args.batch or d.batch_size, "classes": args.classes or _classes(cfg)}


def _classes(cfg: Any) -> int:
    if cfg.student.num_classes:
        return cfg.student.num_classes
    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_task

    try:
        task = build_task(cfg, DistInfo())
        return task.model_classes(task.val_dataset())
    except (OSError, ValueError, KeyError):  # no dataset here: the paper datasets' counts
        return 80 if cfg.student.task == "detection" else 19


# ------------------------------------------------------------------------------------ measures
def method_parameters(cfg: Any, task: Any, models: Any, names: list[str], sample: list) -> dict[str, Any]:
    """Per method name: the parameter count of its training-only modules, built for this config's
    taps (the config's own method with its options, others with their defaults), or
    ``{"skipped": reason}`` when it cannot be built for them."""
    from acamkd.methods import build, parse_options

    t_channels = task.tap_channels(models.teacher, "teacher", sample)
    s_channels = task.tap_channels(models.student, "student", sample)
    out: dict[str, Any] = {}
    for name in names:
        try:
            options = parse_options(name, cfg.method.options if name == cfg.method.name else {})
            method = build(name, teacher_channels=t_channels, student_channels=s_channels, options=options)
            out[name] = {"params": sum(p.numel() for p in method.parameters())}
        except Exception as err:  # noqa: BLE001 - reported, not raised: the other methods still count
            out[name] = {"skipped": f"{type(err).__name__}: {err}"[:500]}
    return out


def _model_input(task: Any, images: Any) -> Any:
    """What the model takes: ``Task.model_input`` of a list of images; a batched tensor as it is."""
    return task.model_input(images) if isinstance(images, list) else images


def inference_cost(task: Any, model: Any, batch: Any, device: str, warmup: int, repeats: int,
                   amp: str = "none") -> dict[str, Any]:
    """One model's inference (eval, no grad, full forward): ``params``, ``flops`` of one image (the
    batch's first), and over the whole ``batch`` ``median_ms``, ``images_per_s``, ``peak_mib``
    (:func:`acamkd.bench.measure.time_and_peak`, which on CPU resets the resident-set high-water
    mark first, so building or exporting the model before does not count)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from acamkd.bench.measure import time_and_peak
    from acamkd.engine.step import autocast_for

    dev = torch.device(device)
    model = model.to(dev).eval()
    images, _ = task.to_device(batch, dev)
    inputs = _model_input(task, images)
    single = _model_input(task, images[:1])
    autocast = autocast_for(amp, dev)
    with torch.no_grad(), autocast():
        counter = FlopCounterMode(display=False)
        with counter:
            model(single)
    flops = int(counter.get_total_flops())

    def forward() -> None:
        with torch.no_grad(), autocast():
            model(inputs)

    times, peak = time_and_peak(forward, device, warmup, repeats)
    median = statistics.median(times) / 1e3
    n = task.batch_size(batch)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": flops, "median_ms": median * 1e3,
            "images_per_s": n / median, "peak_mib": peak / 2**20}


def exported_student(cfg: Any, task: Any, models: Any, num_classes: int, folder: str) -> Any:
    """The student as deployed: a distillation checkpoint of ``models`` (student + method) written,
    exported by ``engine/run.py:export_student`` (student tensors only, as safetensors) and loaded
    strictly into a freshly built student of ``num_classes`` classes.

    Raises:
        what ``export_student`` raises (no validation data, a class count that differs from the data's).
    """
    from safetensors.torch import load_file

    from acamkd.engine.checkpoint import save_checkpoint
    from acamkd.engine.run import export_student
    from acamkd.models.weights import load_weights_strict

    checkpoint = os.path.join(folder, "distilled.pt")
    save_checkpoint(checkpoint, {"student": models.student.state_dict(), "method": models.method.state_dict(),
                                 "step": 0}, keep_previous=False)
    out = os.path.join(folder, "student.safetensors")
    export_student(cfg, checkpoint, out)
    fresh = task.build_model(replace(cfg.student, pretrained=None, checkpoint=None), num_classes, "student")
    load_weights_strict(fresh, load_file(out), out, f"{cfg.student.arch}/{cfg.student.backbone}")
    return fresh


def _build(spec: dict[str, Any]) -> tuple[Any, Any, Any, Any]:
    """(cfg, task, random batch, models) of a worker, as ``acamkd bench distill`` builds them."""
    import torch

    from acamkd.config import load_config
    from acamkd.engine.distributed import DistInfo
    from acamkd.engine.run import build_models, build_task

    torch.manual_seed(0)
    cfg = load_config(spec["config"], spec["overrides"])
    task = build_task(cfg, DistInfo(device=torch.device(spec["device"])))
    batch = task.random_batch(spec["batch"], tuple(spec["image"]), spec["classes"], torch.Generator().manual_seed(0))
    sample = task.to_device(batch, torch.device("cpu"))[0][:1]
    models = build_models(cfg, task, "distill", spec["classes"], sample=lambda: list(sample), random_init=True)
    return cfg, task, batch, models


def _inference_worker(role: str, spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from acamkd.bench.distill import calibrate_batchnorm

    cfg, task, batch, models = _build(spec)
    images = task.to_device(batch, torch.device("cpu"))[0]
    for model in (models.teacher, models.student):  # random BatchNorm statistics can overflow a deep net
        calibrate_batchnorm(task, model, None, images)
    if role == "exported":
        with tempfile.TemporaryDirectory() as folder:
            model = exported_student(cfg, task, models, spec["classes"], folder)
    else:
        model = models.teacher if role == "teacher" else models.student
    return inference_cost(task, model, batch, spec["device"], spec["warmup"], spec["repeats"], cfg.train.amp)


def _run_inference(role: str, spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "acamkd.cost", "--worker", role], input=json.dumps(spec),
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return {"skipped": (proc.stderr or proc.stdout).strip()[-500:]}


# ------------------------------------------------------------------------------------ report
def cost_report(config: str, overrides: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the module docstring, as one JSON-able dict.

    Raises:
        ValueError: CONFIG is not a distillation config (no teacher or method); an unknown ``--methods`` name.
        ConfigError: a bad config or override (named).
    """
    import difflib

    import torch

    from acamkd.bench.distill import bench_overrides, run_variant
    from acamkd.bench.measure import machine
    from acamkd.config import load_config
    from acamkd.methods import available

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shortcuts = argparse.Namespace(overrides=overrides, arch=None, student=None, teacher=None, dtype=args.dtype,
                                   task=None)
    common = bench_overrides(shortcuts)  # the bench's optimizer settings and bf16 switch
    cfg = load_config(config, common)
    if cfg.teacher is None or cfg.method.name is None:
        raise ValueError(f"acamkd cost: {config} has no teacher or method.name: give a distillation config")
    names = available() if not args.methods else [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        if name not in available():
            close = difflib.get_close_matches(name, available(), n=3)
            raise ValueError(f"--methods: unknown method {name!r}{f'; did you mean {close}?' if close else ''} "
                             f"(known: {available()})")
    spec = {"device": device, "config": config, "overrides": common, **default_spec(cfg, args),
            "repeats": args.repeats or (20 if device == "cuda" else 3),
            "warmup": args.warmup if args.warmup is not None else (5 if device == "cuda" else 1)}

    def with_method(name: str) -> dict[str, Any]:
        extra = [] if name == cfg.method.name else [f"method.name={name}", "method.options={}"]
        return {**spec, "overrides": common + extra}

    training = {"student": run_variant("student", spec), "teacher": run_variant("teacher", spec)}
    methods = {name: {"step": run_variant("distill", with_method(name))} for name in names}
    _, task, batch, models = _build(spec)
    sample = task.to_device(batch, torch.device("cpu"))[0][:1]
    for name, params in method_parameters(cfg, task, models, names, list(sample)).items():
        methods[name]["training_only"] = params
    inference = {role: _run_inference(role, spec) for role in ROLES}
    s, e = inference["student"], inference["exported"]
    s_, t = cfg.student, cfg.teacher
    return {"command": " ".join(["acamkd", "cost", *map(shlex.quote, [config, *overrides])]),
            "config": {**{k: spec[k] for k in ("device", "image", "batch", "classes", "repeats", "warmup")},
                       "teacher": f"{t.arch} {t.backbone}", "student": f"{s_.arch} {s_.backbone}",
                       "method": cfg.method.name, "dtype": args.dtype},
            "machine": machine(), "training": training, "methods": methods, "inference": inference,
            "exported_equals_student": ("flops" in s and "flops" in e and s["flops"] == e["flops"]
                                        and s["params"] == e["params"])}


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def markdown_table(report: dict[str, Any]) -> str:
    """The report as one markdown table (a row per measurement; skipped ones say why), headed by
    the command, the setting and the machine."""
    c, m = report["config"], report["machine"]
    lines = [f"`{report['command']}`: {c['teacher']} -> {c['student']}, {c['image'][0]}x{c['image'][1]}, "
             f"batch {c['batch']}, {c['classes']} classes, {c['dtype']} on {c['device']} "
             f"({m.get('gpu', m['platform'])}, {m['cpu_count']} CPUs, torch {m['torch']}); median of "
             f"{c['repeats']} after {c['warmup']} warm-up", "",
             "| what | ms | images/s | peak MiB | parameters | GFLOPs / image |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(what: str, r: dict[str, Any], params: Any = None) -> None:
        if "skipped" in r:
            reason = r["skipped"].strip().splitlines()[-1][:160].replace("|", "/")
            lines.append(f"| {what} | skipped: {reason} | | | | |")
            return
        flops = r.get("flops")
        lines.append(f"| {what} | {_fmt(r.get('median_ms'), '.1f')} | {_fmt(r.get('images_per_s'), '.2f')} | "
                     f"{_fmt(r.get('peak_mib'), '.0f')} | {_fmt(params if params is not None else r.get('params'), ',')} "
                     f"| {_fmt(None if flops is None else flops / 1e9, '.2f')} |")

    row("train step: student only", report["training"]["student"])
    row("teacher forward (for distillation)", report["training"]["teacher"])
    for name, r in report["methods"].items():
        extra = r.get("training_only", {})
        row(f"train step: distill with {name} (params: its training-only modules)", r["step"], extra.get("params"))
    for role, label in (("teacher", "teacher"), ("student", "student"), ("exported", "exported distilled student")):
        row(f"inference: {label}", report["inference"][role])
    lines += ["", f"exported student's FLOPs and parameters equal the student's: {report['exported_equals_student']}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd cost", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a distillation config (teacher + method)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: train.amp=bf16 (CUDA)")
    parser.add_argument("--image", default=None, help="HEIGHTxWIDTH (default: the config's, see above)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default data.batch_size)")
    parser.add_argument("--classes", type=int, default=None, help="model classes (default: the data's)")
    parser.add_argument("--methods", default=None, help="comma-separated methods to time (default: all registered)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 5 on CUDA, 1 on CPU)")
    parser.add_argument("--json", action="store_true", help="print the JSON report instead of the table")
    parser.add_argument("--out", default=None, help="also write DIR/cost.md and DIR/cost.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    args = args or build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_inference_worker(args.worker, json.loads(sys.stdin.read()))))
        return 0
    if not args.config:
        raise ValueError("acamkd cost: give a distillation CONFIG, e.g. configs/demo/shapes_det_acam.yaml")
    report = cost_report(args.config, list(args.overrides), args)
    table = markdown_table(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cost.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "cost.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1) if args.json else table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

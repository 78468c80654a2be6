"""``acamkd bench acam``: speed and memory of the ACAM-KD fast path against its yardsticks.

On the FPN level shapes of a detector at a given image size, forward + backward of:

* ``floor``: the bare SDPA kernels alone on the fast path's q/k/v shapes (no implementation
  of this method can beat it),
* ``fast``: the whole :class:`~acamkd.methods.acam.ACAM` method (alignment, STCA-FF, masks,
  losses, diversity),
* ``reference``: the materialised-attention vectorised reference
  (:func:`~acamkd.methods.acam_reference.acam_level_vectorised`), skipped with a note when its
  estimated memory does not fit.

Each variant runs in its own process, so peak memory is its own: on CUDA
``max_memory_allocated`` above what the inputs hold; on CPU the growth of the peak resident
set. The reference process also runs the fast path once on the same inputs and parameters and
reports the largest loss and gradient differences.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from typing import Any

from acamkd.bench.levels import LAYOUT_CHOICES
from acamkd.bench.measure import available_bytes, machine, time_and_peak

__all__ = ["main", "build_parser", "run_benchmark"]

VARIANTS = ("floor", "fast", "reference")


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd bench acam", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when available, else cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image", default="800x1333", help="HEIGHTxWIDTH of the input image")
    parser.add_argument("--detector", choices=LAYOUT_CHOICES, metavar="MODEL", default="retinanet",
                        help="whose taps, a registered model: a detector's FPN levels, or a segmenter's stride-8 "
                             "logits ('segmenter' or its name; use --channels 19 --num-masks 19 --image 512x1024 "
                             "for the paper's Cityscapes setting); one of: %(choices)s")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: features in bf16 and the method under bf16 autocast")
    parser.add_argument("--channels", type=int, default=256, help="FPN channels (teacher and student)")
    parser.add_argument("--num-masks", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=None, help="timed iterations (default 20 cuda, 5 cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 cuda, 1 cpu)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    parser.add_argument("--compile", choices=("none", "default", "reduce-overhead", "max-autotune"),
                        default="none", help="torch.compile mode for the fast path")
    parser.add_argument("--attention-layout", choices=("split", "single"), default="split",
                        help="q/k/v layout for SDPA: v split into heads sharing q/k, or one head")
    parser.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                        help="skip ACAM's NaN/inf input check (saves one host sync per step)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


# ----------------------------------------------------------------------------- worker side

def reference_bytes_estimate(batch: int, positions: list[int], dtype_bytes: int) -> int:
    """Rough upper estimate of the materialised reference's peak: every level keeps its
    softmax output (fp32) and a low-precision copy for backward, and the largest level adds
    the logits, their scaled copy and the backward's gradients of the same size."""
    saved = sum(batch * n * n * (4 + dtype_bytes) for n in positions)
    transient = batch * max(positions) ** 2 * (2 * dtype_bytes + 3 * 4)
    return saved + transient


def _make_inputs(cfg: dict[str, Any]):
    import torch

    from acamkd.bench.levels import fpn_level_shapes
    from acamkd.methods.acam import ACAM

    torch.manual_seed(0)
    device, dtype = cfg["device"], (torch.bfloat16 if cfg["dtype"] == "bf16" else torch.float32)
    shapes = fpn_level_shapes(cfg["detector"], *cfg["image"])
    C, B = cfg["channels"], cfg["batch"]
    method = ACAM({name: C for name in shapes}, num_masks=cfg["num_masks"], init_std=0.5,
                  check_finite=cfg.get("check_finite", True),
                  attention_layout=cfg.get("attention_layout", "split")).to(device)
    teacher = {n: torch.randn(B, C, h, w, device=device, dtype=dtype) for n, (h, w) in shapes.items()}
    student = {n: torch.randn(B, C, h, w, device=device, dtype=dtype).requires_grad_(True)
               for n, (h, w) in shapes.items()}
    return method, teacher, student, shapes, dtype


def _step_functions(cfg, method, teacher, student, dtype):
    """name -> zero-arg callable doing forward + backward of that variant."""
    import torch
    import torch.nn.functional as F

    from acamkd.methods.acam_reference import acam_level_vectorised
    from acamkd.ops.attention import AttentionLayout

    device = cfg["device"]
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg["dtype"] == "bf16")

    forward = method
    if cfg["compile"] != "none":
        forward = torch.compile(method, mode=None if cfg["compile"] == "default" else cfg["compile"])

    def fast():
        with autocast:
            losses = forward(teacher, student)
        sum(losses.values()).backward()

    def reference():
        with autocast:
            total = sum(sum(acam_level_vectorised(method.level(n), teacher[n], student[n]).losses.values())
                        for n in method.level_names)
        total.backward()

    # The floor: SDPA forward+backward alone, on the q/k/v the fast path hands the kernel.
    C = cfg["channels"]
    from acamkd.methods.acam import ATTENTION_LAYOUTS

    layout = AttentionLayout.for_dims(C // 2, C, split_value=ATTENTION_LAYOUTS[cfg.get("attention_layout", "split")])
    qkv = []
    for name in method.level_names:
        B, _, h, w = teacher[name].shape
        shape_qk = (B, 1, h * w, layout.head_dim)
        q = torch.randn(shape_qk, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(shape_qk, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, h * w, layout.heads, layout.head_dim, device=device, dtype=dtype).transpose(1, 2)
        qkv.append((q, k, v.requires_grad_(True)))

    def floor():
        outs = [F.scaled_dot_product_attention(q.expand_as(v), k.expand_as(v), v, scale=1 / math.sqrt(C // 2))
                for q, k, v in qkv]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    def zero_grads():
        for p in method.parameters():
            p.grad = None
        for t in student.values():
            t.grad = None
        for tensors in qkv:
            for t in tensors:
                t.grad = None

    return {"fast": fast, "reference": reference, "floor": floor}, zero_grads


def _attention_ops(step) -> list[str]:
    """Names of the SDPA implementations that ran inside ``step`` (which backend was chosen)."""
    from torch.profiler import profile

    with profile() as prof:
        step()
    names = {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key and e.key != "aten::scaled_dot_product_attention"}
    return sorted(names)


def _compare(method, teacher, student, dtype, device) -> dict[str, float]:
    """Largest |fast - reference| over losses and over grads of student features and parameters."""
    import torch

    from acamkd.methods.acam_reference import acam_level_vectorised

    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    inputs = [student[n] for n in method.level_names] + list(method.parameters())

    def run(fn):
        with autocast:
            per_level = [fn(n) for n in method.level_names]
        losses = torch.stack([v.float() for level in per_level for v in level.values()])
        grads = torch.autograd.grad(losses.sum(), inputs, allow_unused=True)
        return losses.detach(), grads

    fast_losses, fast_grads = run(lambda n: method.level(n)(teacher[n], student[n]).losses)
    ref_losses, ref_grads = run(lambda n: acam_level_vectorised(method.level(n), teacher[n], student[n]).losses)
    grad_diff, grad_scale = 0.0, 0.0
    for a, b in zip(fast_grads, ref_grads):
        if a is None or b is None:
            continue
        grad_diff = max(grad_diff, (a.float() - b.float()).abs().max().item())
        grad_scale = max(grad_scale, b.float().abs().max().item())
    loss_diff = (fast_losses - ref_losses).abs().max().item()
    return {
        "max_loss_abs_diff": loss_diff,
        "max_loss_rel_diff": loss_diff / max(ref_losses.abs().max().item(), 1e-30),
        "max_grad_abs_diff": grad_diff,
        "max_grad_rel_diff": grad_diff / max(grad_scale, 1e-30),
    }


def run_worker(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one variant in this process; returns a JSON-able dict."""
    import torch

    device = cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    torch.set_grad_enabled(True)
    method, teacher, student, shapes, dtype = _make_inputs(cfg)
    result: dict[str, Any] = {"variant": variant}
    if variant == "reference":
        estimate = reference_bytes_estimate(cfg["batch"], [h * w for h, w in shapes.values()],
                                            torch.finfo(dtype).bits // 8)
        available = available_bytes(device)
        result["estimated_peak_gib"] = estimate / 2**30
        if estimate > 0.9 * available:
            result["skipped"] = (f"would not fit: estimated {estimate / 2**30:.1f} GiB, "
                                 f"{available / 2**30:.1f} GiB available on {device}")
            return result
    steps, zero_grads = _step_functions(cfg, method, teacher, student, dtype)
    step = steps[variant]
    try:
        times, peak = time_and_peak(step, device, cfg["warmup"], cfg["repeats"], before_each=zero_grads)
    except (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), RuntimeError) as err:
        if "memory" not in str(err).lower():
            raise
        result["skipped"] = f"out of memory: {str(err).splitlines()[0]}"
        return result
    result.update(median_ms=statistics.median(times), min_ms=min(times), peak_mib=peak / 2**20)
    zero_grads()
    result["attention_ops"] = _attention_ops(step)
    if variant == "reference":
        zero_grads()
        result.update(_compare(method, teacher, student, dtype, device))
    return result


# ----------------------------------------------------------------------------- parent side

def _config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from acamkd.bench.levels import parse_image_size

    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {VARIANTS}")
    if args.batch < 1 or args.channels < 2 or args.num_masks < 1:
        raise SystemExit("--batch and --num-masks must be >= 1, --channels >= 2")
    return {
        "device": device,
        "batch": args.batch,
        "image": list(parse_image_size(args.image)),
        "detector": args.detector,
        "dtype": args.dtype,
        "channels": args.channels,
        "num_masks": args.num_masks,
        "repeats": args.repeats if args.repeats is not None else (20 if device == "cuda" else 5),
        "warmup": args.warmup if args.warmup is not None else (5 if device == "cuda" else 1),
        "compile": args.compile,
        "check_finite": args.check_finite,
        "attention_layout": args.attention_layout,
        "variants": variants,
    }


def _spawn(variant: str, cfg: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "acamkd.bench.acam", "--worker", variant]
    proc = subprocess.run(cmd, input=json.dumps(cfg), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        why = "killed (likely out of memory)" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"variant": variant, "skipped": f"worker {why}: {' | '.join(tail)}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(cfg: dict[str, Any]) -> dict[str, Any]:
    from acamkd.bench.levels import fpn_level_shapes

    shapes = fpn_level_shapes(cfg["detector"], *cfg["image"])
    results = {v: _spawn(v, cfg) for v in cfg["variants"]}
    report: dict[str, Any] = {"config": cfg, "machine": machine(),
                              "levels": {n: {"h": h, "w": w, "positions": h * w} for n, (h, w) in shapes.items()},
                              "results": results}
    ok = {v: r for v, r in results.items() if "median_ms" in r}
    ratios = {}
    if "fast" in ok and "floor" in ok:
        ratios["fast_over_floor_time"] = ok["fast"]["median_ms"] / ok["floor"]["median_ms"]
    if "fast" in ok and "reference" in ok:
        ratios["reference_over_fast_time"] = ok["reference"]["median_ms"] / ok["fast"]["median_ms"]
        ratios["reference_over_fast_peak_memory"] = ok["reference"]["peak_mib"] / max(ok["fast"]["peak_mib"], 1e-9)
    report["ratios"] = ratios
    return report


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        f"acamkd bench acam: {cfg['detector']} {cfg['image'][0]}x{cfg['image'][1]} batch {cfg['batch']} "
        f"{cfg['dtype']} on {cfg['device']} ({report['machine'].get('gpu', report['machine']['platform'])}, "
        f"torch {report['machine']['torch']}), C={cfg['channels']}, M={cfg['num_masks']}, compile={cfg['compile']}, "
        f"check_finite={cfg.get('check_finite', True)}, attention_layout={cfg.get('attention_layout', 'split')}",
        "levels: " + ", ".join(f"{n} {v['h']}x{v['w']}" for n, v in report["levels"].items()),
        f"{'variant':<10} {'median ms':>10} {'min ms':>9} {'peak MiB':>10}  attention kernel",
    ]
    for variant, r in report["results"].items():
        if "median_ms" in r:
            ops = ", ".join(op.replace("aten::", "") for op in r.get("attention_ops", [])) or "-"
            lines.append(f"{variant:<10} {r['median_ms']:>10.2f} {r['min_ms']:>9.2f} {r['peak_mib']:>10.1f}  {ops}")
        else:
            lines.append(f"{variant:<10} {'skipped':>10}  {r.get('skipped', '')}")
    for key, value in report["ratios"].items():
        lines.append(f"{key}: {value:.2f}")
    ref = report["results"].get("reference", {})
    if "max_loss_abs_diff" in ref:
        lines.append(f"fast vs reference: max loss diff {ref['max_loss_abs_diff']:.3g} "
                     f"(rel {ref['max_loss_rel_diff']:.3g}), max grad diff {ref['max_grad_abs_diff']:.3g} "
                     f"(rel {ref['max_grad_rel_diff']:.3g})")
    return "\n".join(lines)


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    if args.worker:
        cfg = json.loads(sys.stdin.read())
        print(json.dumps(run_worker(args.worker, cfg)))
        return 0
    report = run_benchmark(_config_from_args(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

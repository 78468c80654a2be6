"""MasKD stage 1: learn the receptive tokens (and the token-weight branch) on the frozen teacher.

``acamkd maskd-tokens CONFIG [--out FILE] [overrides]`` writes the tokens of every teacher tap to
a safetensors file that the ``maskd`` method loads (``method.options.token_file=FILE``);
``method.options.token_file=auto`` (the default) makes ``acamkd distill`` / ``compare`` do this
first, into ``<train.output_dir>/maskd_tokens.safetensors``, and reuse the file while the
teacher and the stage-1 settings are unchanged (:func:`resolve_token_file`).

What it does, after the authors' ``hunto/MasKD`` @ b5af34f, ``mmdetection/maskd_hook.py``
(``MasKDHook``), ``mmdetection/maskd.py`` (``MaskModule.forward_train``) and
``mmdetection/configs/maskd/*.py`` (detection), ``segmentation/train_mask_module.py`` (segmentation):

* the teacher is built by the engine's builders (``Task.build_model``, its checkpoint loaded
  strictly), every parameter frozen, in training mode with its BatchNorm layers in eval mode;
* forward hooks on the teacher's tap modules (torchdistill-style: no model edit) replace each
  tapped output ``F_T`` by ``sum_i p_i m_i * F_T`` (:meth:`ReceptiveTokens.masked_feature`),
  so the head sees the masked features;
* loss = the teacher's own task loss on the batch (a training-mode forward with targets, as
  the engine's training step runs a student: ``Task.student_forward``) + ``dice_weight`` x the
  Dice coefficient of each level's masks, summed over levels;
* only the tokens and branches train: Adam (lr 0.01, weight decay 1e-3) with a cosine decay to
  1e-6 over 2000 iterations by default (``method.options.token_*``; SGD momentum 0.9 and poly
  0.9 for the authors' segmentation and Faster R-CNN settings);
* the file is written atomically (temporary file, fsync, rename); meanwhile stage 1 is
  kill-safe as training is: a checkpoint every ``token_checkpoint_every`` iterations and on
  SIGINT/SIGTERM (``<file>.partial.pt``) from which a rerun resumes to the same tokens.

Segmentation: the tap is the stride-8 logits (the ``classifier`` output), which is what the
authors' segmentation code masks too (``outputs[0]`` of their models, 19 channels, before
upsampling; ``train_mask_module.py``), so the same hooks serve both tasks.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from acamkd.methods.base import level_key
from acamkd.methods.maskd import AUTO, TOKEN_FILE_FORMAT, MasKDOptions, ReceptiveTokens, load_token_file, token_state

__all__ = ["PARTIAL_SUFFIX", "TOKEN_FILE_NAME", "MaskingHooks", "build_parser", "learn_tokens", "main",
           "maskd_options", "partial_path", "resolve_token_file", "stage1_key", "token_lr_factor", "write_token_file"]

logger = logging.getLogger("acamkd")

TOKEN_FILE_NAME = "maskd_tokens.safetensors"  # in train.output_dir for token_file=auto
PARTIAL_SUFFIX = ".partial.pt"  # stage 1's resumable checkpoint: <token file>.partial.pt
STAGE1_VERSION = 2  # in the key: 2 = the trainer's ResumableSampler order (1 drew the order from a seeded generator)
_PARTIAL_KEYS = ("key", "iteration", "epoch", "batches_done", "tokens", "optimizer", "scheduler", "torch_rng")
MIN_LR = 1e-6  # the authors' CosineAnnealing min_lr
SGD_MOMENTUM = 0.9  # the authors' SGD settings (segmentation stage 1; mmdet's Faster R-CNN default)
POLY_POWER = 0.9  # segmentation stage 1: lr = base (1 - it / max) ** 0.9


def maskd_options(cfg: Any) -> MasKDOptions:
    """The ``maskd`` options of ``cfg``: its ``method.options`` when ``method.name`` is maskd, else the
    defaults for the student's task (``MasKDOptions.task_defaults``)."""
    from acamkd.methods import parse_options

    if cfg.method.name == "maskd":
        return parse_options("maskd", cfg.method.options)
    logger.info("method.name is %r, not maskd: stage 1 uses maskd's default options for %s", cfg.method.name,
                cfg.student.task)
    return MasKDOptions(**MasKDOptions.task_defaults.get(cfg.student.task, {}))


def token_lr_factor(iteration: int, total: int, schedule: str, base_lr: float) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based): cosine from 1 to ``MIN_LR / base_lr``
    (mmcv's ``CosineAnnealing`` with ``min_lr``) or poly ``(1 - it / total) ** 0.9``."""
    progress = min(iteration, total) / max(total, 1)
    if schedule == "poly":
        return (1.0 - progress) ** POLY_POWER
    floor = min(MIN_LR / base_lr, 1.0)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------ the hooks
def _replace_leaves(name: str, value: Any, fn) -> Any:
    """``value`` with every tensor ``t`` replaced by ``fn(flat_name, t)``; dicts and sequences keep
    their type and recurse with ``.key`` / ``.i`` (the naming of :class:`acamkd.models.FeatureTaps`)."""
    if isinstance(value, Tensor):
        return fn(name, value)
    if isinstance(value, Mapping):
        return type(value)((k, _replace_leaves(f"{name}.{k}", v, fn)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_replace_leaves(f"{name}.{i}", v, fn) for i, v in enumerate(value))
    return value


class MaskingHooks:
    """Forward hooks on ``model``'s tap modules that replace each tapped level's output ``F`` by
    ``tokens[level].masked_feature(F)`` and keep the level's Dice coefficient.

    ``taps`` maps an alias to a module path, ``rename`` a flat output name to a level name (as
    :class:`acamkd.models.FeatureTaps`); ``tokens`` maps level names to :class:`ReceptiveTokens`.
    Use as a context manager (the hooks come off at exit). :meth:`take_dice` returns the last
    forward's ``{level: dice}`` and clears it.

    Raises:
        KeyError: a tap path that is not a submodule of ``model``.
        RuntimeError (:meth:`take_dice`): a level whose module did not run in the forward.
    """

    def __init__(self, model: nn.Module, taps: Mapping[str, str], rename: Mapping[str, str],
                 tokens: Mapping[str, ReceptiveTokens]) -> None:
        self.tokens, self.rename = dict(tokens), dict(rename)
        self._dice: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        self._handles = []
        for alias, path in taps.items():
            if path not in modules:
                raise KeyError(f"maskd-tokens: tap {alias!r}: no submodule {path!r} in the teacher")
            self._handles.append(modules[path].register_forward_hook(self._hook(alias)))

    def _hook(self, alias: str):
        def mask_leaf(name: str, feat: Tensor) -> Tensor:
            level = self.rename.get(name, name)
            module = self.tokens.get(level)
            if module is None:
                return feat
            masked, dice = module.masked_feature(feat.float() if feat.dtype != torch.float64 else feat)
            self._dice[level] = dice
            return masked.to(feat.dtype)

        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            return _replace_leaves(alias, output, mask_leaf)
        return hook

    def take_dice(self) -> dict[str, Tensor]:
        missing = [level for level in self.tokens if level not in self._dice]
        if missing:
            raise RuntimeError(f"maskd-tokens: the teacher's training forward did not run the taps of levels "
                               f"{missing}; tap modules that the training forward runs (teacher.taps)")
        dice, self._dice = self._dice, {}
        return dice

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> MaskingHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


# ------------------------------------------------------------------------------ the file
def stage1_key(cfg: Any, options: MasKDOptions, teacher_sha256: str | None) -> str:
    """A digest of what decides the tokens: the teacher (file digest, arch, backbone, taps), the
    data, the seed and the stage-1 options. ``token_file=auto`` reuses a file with the same key."""
    data = dataclasses.asdict(cfg.data)
    for where in ("workers", "root", "img_dir", "ann_file"):  # where the same data lives: a resume may move it
        data.pop(where, None)
    facts = {"stage1": STAGE1_VERSION, "teacher": [cfg.teacher.arch, cfg.teacher.backbone, teacher_sha256, cfg.teacher.taps],
             "data": data, "seed": cfg.train.seed,
             "options": {k: getattr(options, k) for k in ("num_tokens", "weight_mask", "token_iterations",
                                                          "token_optimizer", "token_lr", "token_weight_decay",
                                                          "token_schedule", "dice_weight")}}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def write_token_file(path: str, tokens: Mapping[str, ReceptiveTokens], meta: Mapping[str, str]) -> None:
    """Write ``tokens`` (``{level: ReceptiveTokens}``) and ``meta`` (strings) to ``path`` as
    safetensors, atomically: a temporary file in the same folder, fsync, rename, folder fsync.

    Raises:
        OSError: the file cannot be written (names the file); the temporary file is removed and a
            previous file at ``path`` is intact.
    """
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    channels = {level: int(mod.tokens.shape[1]) for level, mod in tokens.items()}
    first = next(iter(tokens.values()))
    metadata = {"format": TOKEN_FILE_FORMAT, "levels": json.dumps(list(tokens)), "channels": json.dumps(channels),
                "num_tokens": str(first.num_tokens), "weight_mask": "true" if first.prob is not None else "false",
                **{k: str(v) for k, v in meta.items()}}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-tokens-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(token_state(dict(tokens)), tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:  # safetensors raises its own error types for I/O failures
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(f"cannot write the MasKD token file {path}: {err}") from None
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ------------------------------------------------------------------------------ stage 1
def _teacher_taps(cfg: Any, task: Any, teacher: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """``(taps, rename)`` of the teacher: ``teacher.taps`` if configured, else the default levels."""
    if cfg.teacher.taps:
        return {t: t for t in cfg.teacher.taps}, {}
    return task.default_taps(teacher)


def _freeze(teacher: nn.Module) -> None:
    """No parameter trains; training mode (the task losses need it) with BatchNorm in eval mode."""
    teacher.requires_grad_(False)
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _optimizer(params: list[nn.Parameter], options: MasKDOptions) -> torch.optim.Optimizer:
    if options.token_optimizer == "sgd":
        return torch.optim.SGD(params, lr=options.token_lr, momentum=SGD_MOMENTUM,
                               weight_decay=options.token_weight_decay)
    return torch.optim.Adam(params, lr=options.token_lr, weight_decay=options.token_weight_decay)


def partial_path(out: str) -> str:
    """Where stage 1 keeps its resumable checkpoint while it learns the tokens for ``out``."""
    return out + PARTIAL_SUFFIX


def _read_partial(path: str, key: str) -> dict[str, Any] | None:
    """The stage-1 checkpoint at ``path`` if it was written for ``key`` (same teacher, data, seed,
    options), else None (a checkpoint of other settings is logged and will be overwritten)."""
    from acamkd.engine.checkpoint import CheckpointCorrupted, load_checkpoint

    if not os.path.isfile(path):
        return None
    try:
        state = load_checkpoint(path)
    except (CheckpointCorrupted, ValueError) as err:
        logger.warning("maskd-tokens: %s; learning from the start", err)
        return None
    missing = [k for k in _PARTIAL_KEYS if k not in state]
    if missing:
        logger.warning("maskd-tokens: %s lacks %s (not a stage-1 checkpoint?); learning from the start", path, missing)
        return None
    if state.get("key") != key:
        logger.info("maskd-tokens: %s was written for another teacher, data or options: learning from the start",
                    path)
        return None
    return state


def learn_tokens(cfg: Any, task: Any, train_set: Any, out: str, options: MasKDOptions | None = None) -> dict[str, Any]:
    """Stage 1 (module docstring): learn the tokens of every teacher tap on ``train_set`` and write
    them to ``out``. Seeded by ``train.seed`` inside a forked RNG (the caller's RNG is untouched).
    Returns a summary: ``out``, ``levels``, ``iterations``, the last ``task_loss`` and ``dice``,
    ``resumed_from`` (the iteration a checkpoint gave, 0 for a fresh start), seconds, and
    ``stop_signal`` if a stop signal came during the last iteration (the tokens are written).

    Kill-safe as training is: every ``token_checkpoint_every`` iterations, and when SIGINT or
    SIGTERM arrives (at the next iteration boundary), the tokens, optimizer, schedule, RNG state and
    data position are saved atomically to ``out + ".partial.pt"`` (:func:`partial_path`); a later
    call with the same teacher file, data, seed and stage-1 options (:func:`stage1_key`) resumes
    from there to the same tokens as an uninterrupted run (the data order is
    :class:`~acamkd.engine.sampling.ResumableSampler`'s, the augmentation
    :class:`~acamkd.engine.sampling.PerSampleSeed`'s). The checkpoint is removed once ``out`` is written.

    Raises:
        ValueError / FileNotFoundError: no ``teacher.checkpoint`` (or no file there); a non-finite
            loss (names the iteration); an empty training set.
        TrainingInterrupted: a stop signal arrived; the checkpoint was saved first (names it).
        OSError: ``out`` or the checkpoint cannot be written.
    """
    from torch.utils.data import DataLoader

    from acamkd.engine.checkpoint import save_checkpoint
    from acamkd.engine.run import sha256_of
    from acamkd.engine.sampling import PerSampleSeed, ResumableSampler
    from acamkd.engine.trainer import StopSignals, TrainingInterrupted, ignore_stop_signals

    options = options or maskd_options(cfg)
    teacher_cfg = cfg.teacher
    if teacher_cfg is None or not teacher_cfg.checkpoint:
        raise ValueError("maskd-tokens learns the tokens on a trained teacher: set teacher.checkpoint=PATH")
    if not os.path.isfile(teacher_cfg.checkpoint):
        raise FileNotFoundError(f"teacher.checkpoint: no file at {teacher_cfg.checkpoint}")
    device = task.info.device
    start = time.perf_counter()
    teacher_sha = sha256_of(teacher_cfg.checkpoint)
    key = stage1_key(cfg, options, teacher_sha)
    partial, total, every = partial_path(out), options.token_iterations, options.token_checkpoint_every
    batch_size = cfg.data.batch_size
    sampler = ResumableSampler(len(train_set), shuffle=True, seed=cfg.train.seed)
    per_epoch = len(sampler) // batch_size if task.drop_last else math.ceil(len(sampler) / batch_size)
    if per_epoch < 1:
        raise ValueError(f"maskd-tokens: the training set gives no batch ({len(train_set)} images, "
                         f"data.batch_size={batch_size})")
    dataset = PerSampleSeed(train_set, cfg.train.seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.train.seed)
        teacher = task.build_model(teacher_cfg, task.model_classes(train_set), "teacher")
        taps, rename = _teacher_taps(cfg, task, teacher)
        channels = task.tap_channels(teacher, "teacher", [train_set[0][0]])
        tokens = {level: ReceptiveTokens(c, options.num_tokens, options.weight_mask) for level, c in channels.items()}
        holder = nn.ModuleDict({level_key(level): mod for level, mod in tokens.items()}).to(device)
        teacher.to(device)
        _freeze(teacher)
        optimizer = _optimizer(list(holder.parameters()), options)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: token_lr_factor(
            it, options.token_iterations, options.token_schedule, options.token_lr))
        it = epoch = batches_done = 0  # iterations done; the epoch; its batches done
        state = _read_partial(partial, key)
        if state is not None:
            holder.load_state_dict(state["tokens"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and "cuda_rng" in state:  # absent if written on a CPU
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            it, epoch, batches_done = state["iteration"], state["epoch"], state["batches_done"]
            logger.info("maskd-tokens: resuming from iteration %d/%d (%s)", it, total, partial)
        resumed_from = it

        def save() -> None:
            save_checkpoint(partial, {"key": key, "iteration": it, "epoch": epoch, "batches_done": batches_done,
                                      "tokens": holder.state_dict(), "optimizer": optimizer.state_dict(),
                                      "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                                      **({"cuda_rng": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})},
                            keep_previous=False)

        recorder = task.make_taps(teacher, "teacher")
        log_every = max(1, int(getattr(cfg.train, "log_every", 0) or 50))
        task_loss = dice_total = torch.zeros(())
        try:
            with MaskingHooks(teacher, taps, rename, tokens) as hooks, StopSignals() as stop:
                while it < total:
                    if batches_done >= per_epoch:
                        epoch, batches_done = epoch + 1, 0
                    sampler.set_epoch(epoch, start=batches_done * batch_size)
                    dataset.set_epoch(epoch)
                    # generator: the loader's base seed must not draw from the global generator, or a
                    # resumed run (one more loader) would shift every later draw (dropout, samplers)
                    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                        num_workers=cfg.data.workers, collate_fn=task.collate,
                                        drop_last=task.drop_last, generator=torch.Generator(),
                                        worker_init_fn=ignore_stop_signals if cfg.data.workers else None)
                    for batch in loader:
                        images, targets = task.to_device(batch, device)
                        losses, _ = task.student_forward(teacher, recorder, images, targets)
                        task_loss = sum(losses.values())
                        dice_total = sum(hooks.take_dice().values())
                        loss = task_loss + options.dice_weight * dice_total
                        if not torch.isfinite(loss):
                            raise ValueError(f"maskd-tokens: non-finite loss at iteration {it}: task "
                                             f"{float(task_loss)}, dice {float(dice_total)}; lower "
                                             f"method.options.token_lr")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        task_loss, dice_total = task_loss.detach(), dice_total.detach()
                        optimizer.step()
                        scheduler.step()
                        it, batches_done = it + 1, batches_done + 1
                        if (it - 1) % log_every == 0 or it == total:
                            logger.info("maskd-tokens %d/%d: task loss %.4f, dice %.4f, lr %.3g", it, total,
                                        float(task_loss), float(dice_total), scheduler.get_last_lr()[0])
                        if it >= total:
                            break  # a signal now is reported after the tokens are written
                        if stop.signum is not None or (every and it % every == 0):
                            save()
                        if stop.signum is not None:
                            raise TrainingInterrupted(stop.signum, it, partial)
                    else:
                        batches_done = per_epoch  # the epoch ran out (a resumed epoch's rest included)
        finally:
            recorder.remove()
    summary = {"out": out, "levels": list(tokens), "channels": channels, "iterations": total,
               "task_loss": float(task_loss), "dice": float(dice_total), "resumed_from": resumed_from,
               "seconds": round(time.perf_counter() - start, 3)}
    write_token_file(out, tokens, {
        "task": task.name, "teacher": f"{teacher_cfg.arch}/{teacher_cfg.backbone}", "teacher_sha256": teacher_sha,
        "iterations": total, "key": key,
        "final": json.dumps({"task_loss": summary["task_loss"], "dice": summary["dice"]})})
    if os.path.exists(partial):
        os.unlink(partial)
    logger.info("maskd-tokens: wrote %s (%d levels, %d tokens each) in %.1f s", out, len(tokens),
                options.num_tokens, summary["seconds"])
    if stop.signum is not None:  # it came during the last iteration: the tokens are written
        summary["stop_signal"] = stop.signum  # resolve_token_file stops before stage 2
    return summary


def _warn_if_warmup_never_ends(cfg: Any, options: MasKDOptions, train_set: Any) -> None:
    """Log a warning when ``custom_mask_warmup`` is at least the run's optimizer steps: the
    student's masks would never join (the authors' warm-ups are 3-5% of their schedules)."""
    if not options.custom_mask:
        return
    t = cfg.train
    if t.iterations is not None:
        total = t.iterations
    elif t.epochs is not None:
        per_epoch = max(1, len(train_set) // max(1, cfg.data.batch_size))
        total = t.epochs * per_epoch  # one process's count: an upper bound under torchrun
    else:
        return
    if options.custom_mask_warmup >= total:
        logger.warning("maskd: custom_mask_warmup=%d >= the run's %d optimizer steps: the student's masks never "
                       "join; scale it to the schedule (the authors': 7000 of ~176k steps, 4%%), e.g. "
                       "method.options.custom_mask_warmup=%d", options.custom_mask_warmup, total,
                       max(1, round(0.04 * total)))


def resolve_token_file(cfg: Any, task: Any, train_set: Any) -> Any:
    """For ``method.name=maskd``: the config with ``method.options.token_file`` resolved.

    ``auto``: ``<train.output_dir>/maskd_tokens.safetensors``, learnt now by :func:`learn_tokens`
    (a single process only: under torchrun a missing or stale file is a RuntimeError naming the
    ``acamkd maskd-tokens`` command to run first) unless a file there has the same :func:`stage1_key`
    (same teacher file, data, seed and stage-1 options: resumed and repeated runs reuse it). A
    path: returned as it is, after checking the file exists. Other methods: ``cfg`` unchanged.

    Raises:
        FileNotFoundError: ``token_file`` names no file (the message names the option and the command).
        RuntimeError: ``auto`` under torchrun without a matching file.
    """
    if cfg.method.name != "maskd":
        return cfg
    from acamkd.engine.run import sha256_of

    options = maskd_options(cfg)
    if options.token_file != AUTO:
        if not os.path.isfile(options.token_file):
            load_token_file(options.token_file)  # raises the named FileNotFoundError
        return cfg
    path = os.path.join(cfg.train.output_dir, TOKEN_FILE_NAME)
    _warn_if_warmup_never_ends(cfg, options, train_set)
    # Every rank reads the cache key itself (the run folder is shared): no rank waits at a barrier
    # through stage 1, which would outlast the NCCL watchdog's timeout (10 minutes by default).
    sha = sha256_of(cfg.teacher.checkpoint) if cfg.teacher and cfg.teacher.checkpoint and \
        os.path.isfile(cfg.teacher.checkpoint) else None
    key = stage1_key(cfg, options, sha)
    cached = None
    if os.path.isfile(path):
        try:
            cached = load_token_file(path)[1].get("key")
        except (ValueError, KeyError, json.JSONDecodeError):
            cached = None
    if cached == key:
        logger.info("maskd: reusing the stage-1 tokens in %s (same teacher, data and options)", path)
    elif task.info.distributed:
        raise RuntimeError(
            f"method.options.token_file=auto: {path} is {'missing' if cached is None else 'from another teacher, data or options'}, "
            f"and stage 1 does not run under torchrun (the other processes would wait past the collective "
            f"timeout). Learn the tokens in one process first, then start torchrun again: "
            f"acamkd maskd-tokens CONFIG [overrides] --out {path}")
    else:
        if cached is not None:
            logger.info("maskd: %s was learnt with another teacher, data or options: learning again", path)
        summary = learn_tokens(cfg, task, train_set, path, options)
        if summary.get("stop_signal") is not None:  # a stop signal in stage 1's last iteration: honour it now
            from acamkd.engine.trainer import TrainingInterrupted

            raise TrainingInterrupted(summary["stop_signal"], options.token_iterations, path)
    method = dataclasses.replace(cfg.method, options={**cfg.method.options, "token_file": path})
    return dataclasses.replace(cfg, method=method)


# ------------------------------------------------------------------------------ command
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="acamkd maskd-tokens", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config with the teacher (teacher.checkpoint) and the data; "
                                       "method.options of maskd if method.name=maskd (for another method's "
                                       "config add method.name=maskd 'method.options={}' before maskd options)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.options.token_iterations=500")
    parser.add_argument("--out", default=None,
                        help=f"output .safetensors file (default: <train.output_dir>/{TOKEN_FILE_NAME})")
    return parser


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """``acamkd maskd-tokens``: learn the tokens, write the file, print a JSON summary."""
    from acamkd.config import load_config
    from acamkd.engine.distributed import init_distributed
    from acamkd.engine.run import build_task
    from acamkd.engine.run_folder import OutputDirError, check_writable

    args = args or build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    out = args.out or os.path.join(cfg.train.output_dir, TOKEN_FILE_NAME)
    if os.path.isdir(out):
        raise OutputDirError(f"--out {out} is a folder: give a file name, e.g. {os.path.join(out, TOKEN_FILE_NAME)}")
    check_writable(os.path.dirname(os.path.abspath(out)), key="--out")
    info = init_distributed()
    if info.distributed:
        raise ValueError("acamkd maskd-tokens runs in one process: start it without torchrun")
    task = build_task(cfg, info)
    train_set, _ = task.datasets()
    print(json.dumps(learn_tokens(cfg, task, train_set, out), indent=1))
    return 0

"""What may change between a run and its ``--resume``, and the check that nothing else did.

A resumed run continues the same computation, so its configuration must be the one stored in
the checkpoint, except for :data:`RESUME_CHANGEABLE`: keys that change only where the run reads
data from, how often it logs, validates or saves, or how long it runs. A change of any other
key (the learning rate, the method's options, the augmentation, ...) would make the run neither
the old one nor a new one; :func:`check_resume_config` refuses it, naming each key with its old
and new value. The allowed changes are used and recorded (the run folder's ``config.yaml`` is
rewritten with them and the log names them), so the folder never records a value that was not
used.
"""
from __future__ import annotations

from typing import Any

__all__ = ["RESUME_CHANGEABLE", "ResumeConfigError", "check_resume_config", "flatten"]

# key -> why it may change on --resume (docs/reliability.md lists the same).
RESUME_CHANGEABLE: dict[str, str] = {
    "train.epochs": "run longer or shorter; the schedule is recomputed for the new length from the current step",
    "train.iterations": "the same, in optimizer steps",
    "train.log_every": "logging frequency",
    "train.val_every": "validation frequency",
    "train.checkpoint_every": "checkpoint frequency",
    "train.eval_teacher_first": "read only before a run starts",
    "data.workers": "loader processes (the data order and augmentation do not depend on them)",
    "eval.batch_size": "evaluation batch size (metrics are per image)",
    "data.root": "where the same data lives now",
    "data.img_dir": "where the same images live now",
    "data.ann_file": "where the same annotations live now",
    "student.pretrained": "read only at initialisation, which a resume skips",
    "teacher.pretrained": "read only at initialisation",
    "teacher.checkpoint": "where the teacher file lives now (its sha256 must be unchanged)",
}


class ResumeConfigError(ValueError):
    """``--resume`` with a configuration that changes what the run computes."""


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.01}}`` -> ``{"train.lr": 0.01}`` (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def check_resume_config(stored: dict[str, Any], current: dict[str, Any], checkpoint: str) -> dict[str, tuple]:
    """Compare the resolved config stored in ``checkpoint`` with the current one.

    Returns the allowed changes ``{key: (old, new)}`` (to be used and recorded).

    Raises:
        ResumeConfigError: any other key differs; the message lists each with its old and new
            value and says what to do.
    """
    old, new = flatten(stored), flatten(current)
    changed = {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
               if key in old and key in new and old[key] != new[key]}
    refused = {k: v for k, v in changed.items() if k not in RESUME_CHANGEABLE}
    if refused:
        lines = "\n".join(f"  {key}: {a!r} in the checkpoint, {b!r} now" for key, (a, b) in refused.items())
        raise ResumeConfigError(
            f"--resume from {checkpoint} with a different configuration:\n{lines}\n"
            f"A resumed run must continue the same computation: resume with the values the run started with "
            f"(its config.yaml), or start a new run (another train.output_dir, or --overwrite). Keys that may "
            f"change on --resume: {', '.join(RESUME_CHANGEABLE)}")
    return {k: v for k, v in changed.items() if k in RESUME_CHANGEABLE}

"""Which classes a segmentation dataset has: ``data.num_classes``, ``data.class_names``, or a
classes file beside the data, else the dataset's own table.

One function, :func:`segmentation_class_names`, decides; the config (ACAM-KD's default M), the
dataset, the models' class-count checks, the per-class IoU keys and the export metadata all use
its answer, so they cannot disagree.

The classes file is ``<root>/classes.txt`` (``root``: the Cityscapes-layout folder, the one
holding ``leftImg8bit/`` and ``gtFine/``): one class name per line, line ``i`` naming train id
``i``; blank lines and lines starting with ``#`` are skipped.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["CLASSES_FILE", "classes_file", "read_class_names", "segmentation_class_names"]

CLASSES_FILE = "classes.txt"


def classes_file(root: str | os.PathLike) -> str | None:
    """``<root>/classes.txt`` if it exists, else None."""
    path = os.path.join(os.fspath(root), CLASSES_FILE)
    return path if os.path.isfile(path) else None


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The class names of a classes file, in train-id order.

    Raises:
        ValueError: the file cannot be read, names no class, or repeats a name (the message names
            the file, the line and what to do).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read the classes file ({e}); it must be UTF-8 text, one class name "
                         f"per line in train-id order") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name in first_line:
            raise ValueError(f"{path}:{number}: class name {name!r} repeats line {first_line[name]}; every train "
                             f"id needs its own name (one per line, in train-id order)")
        first_line[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"{path}: the classes file names no class; write one class name per line, line i "
                         f"naming train id i, or delete the file")
    return names


def segmentation_class_names(num_classes: int | None, class_names: Sequence[str] | None,
                             root: str | os.PathLike | None, default: Sequence[str]) -> list[str]:
    """The class names (``K = len``, train ids ``0..K-1``) of a segmentation dataset.

    In order of precedence: ``class_names`` (``data.class_names``); the classes file of ``root``
    (:func:`classes_file`); ``default`` (the dataset's own table) when ``num_classes`` is None or
    equals its length; else ``class_0 .. class_{K-1}``.

    Raises:
        ValueError: ``num_classes`` disagrees with ``class_names`` or with the classes file (the
            message names ``data.num_classes`` and the file).
    """
    if class_names is not None:
        names = [str(c) for c in class_names]
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"data.num_classes={num_classes} but data.class_names has {len(names)} names: "
                             f"give one name per class (train ids 0..{num_classes - 1}), or drop data.num_classes")
        return names
    found = classes_file(root) if root is not None else None
    if found is not None:
        names = read_class_names(found)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"data.num_classes={num_classes} but {found} names {len(names)} classes: make them "
                             f"agree (one name per line per train id), or drop data.num_classes to use the file")
        return names
    if num_classes is None or num_classes == len(default):
        return list(default)
    return [f"class_{i}" for i in range(num_classes)]

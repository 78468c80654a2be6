"""Figures without a GUI: matplotlib's ``Figure`` on the Agg canvas (pyplot is never imported, so
no interactive backend is ever loaded and nothing reaches the network), saved as PNG."""
from __future__ import annotations

import os
from typing import Any

__all__ = ["DPI", "figure_pixels", "new_figure", "save_png", "run_colours"]

DPI = 100  # pixels per inch: a figure of (w, h) inches is a PNG of (w * DPI, h * DPI) pixels


def figure_pixels(width_in: float, height_in: float) -> tuple[int, int]:
    """The ``(width, height)`` in pixels of the PNG of a figure of that many inches: ``round(inches * DPI)``."""
    return round(width_in * DPI), round(height_in * DPI)


def new_figure(width_in: float, height_in: float) -> Any:
    """A matplotlib ``Figure`` of ``width_in`` x ``height_in`` inches on an Agg canvas
    (``constrained`` layout, so titles and colour bars do not overlap); saved by :func:`save_png`
    it is :func:`figure_pixels` in size (Agg truncates, so the size is nudged a quarter pixel up)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w, h = figure_pixels(width_in, height_in)
    fig = Figure(figsize=((w + 0.25) / DPI, (h + 0.25) / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike) -> str:
    """Write ``fig`` to ``path`` (PNG, folders created) at :data:`DPI`, so the file's pixel size is
    the figure's size in inches times :data:`DPI`; returns the path as a string.

    Raises:
        OSError: the file cannot be written (the message names it).
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=DPI)
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def run_colours(count: int) -> list[Any]:
    """``count`` distinct colours (tab10, then tab20), the same run keeping the same colour in
    every figure of one call."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]

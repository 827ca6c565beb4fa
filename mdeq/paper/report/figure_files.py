"""How a figure reaches disk: PNG and SVG, rewritten only when the drawing changes.

Why: a figure computed live (the tutorial's solver traces, float64 on the CPU) differs in its last bits
from one CPU to another (MKL and oneDNN pick other kernels on AMD and Intel), which moves SVG coordinates
by millionths of a point and flips a byte of the PNG. Rewriting the committed files for that would leave
``git status`` dirty after ``python -m mdeq.reproduce --profile logs`` on every other machine. So a figure
whose new SVG has the same text and every number within ``TOLERANCE`` points of the file on disk keeps
both files as they are; any visible change (a label, a tick, a curve moved by a thousandth of a point)
rewrites both.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import matplotlib

from mdeq.paper.report.style import SVG_HASHSALT

__all__ = ["TOLERANCE", "same_drawing", "write_figure"]

TOLERANCE = 1e-3  # SVG user units (points): far below a pixel at any zoom a reader uses
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")  # matplotlib writes coordinates in fixed notation


def same_drawing(old: str, new: str, tolerance: float = TOLERANCE) -> bool:
    """True when two SVG texts differ only by numbers closer than ``tolerance``."""
    if _NUMBER.split(old) != _NUMBER.split(new):
        return False
    a, b = _NUMBER.findall(old), _NUMBER.findall(new)
    return len(a) == len(b) and all(x == y or abs(float(x) - float(y)) <= tolerance for x, y in zip(a, b))


def write_figure(fig, folder: Path, name: str) -> dict[str, Path]:
    """Write ``folder/name.png`` and ``.svg`` (no dates, a fixed salt for the SVG's ids: the bytes depend on
    the drawing only) unless both are there and the SVG on disk is the ``same_drawing``; return their paths."""
    svg_path, png_path = folder / f"{name}.svg", folder / f"{name}.png"
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": matplotlib.rcParams["svg.hashsalt"] or SVG_HASHSALT}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    kept = (svg_path.is_file() and png_path.is_file()
            and same_drawing(svg_path.read_text(encoding="utf-8"), svg))
    if not kept:
        fig.savefig(png_path, format="png", bbox_inches="tight", metadata={"Software": None})
        svg_path.write_text(svg, encoding="utf-8")
    return {"png": png_path, "svg": svg_path}

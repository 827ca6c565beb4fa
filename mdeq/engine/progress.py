"""Progress bars where a researcher looks: tqdm on a terminal, one tqdm line updated in place in a notebook.

Why not ``tqdm.auto``: in a notebook it draws an ipywidget, and papermill saves a widget as the text of
its first frame ("0%| | 0/7"), so an executed notebook (and the book built from it) would show every
long step as never started. Here a notebook gets tqdm's own text bar in one display output that each
update replaces: live in JupyterLab, and saved by papermill in its final state ("100%| | 7/7 [01:35]"),
one line per long step. Elsewhere (a log file, CI) no bar is drawn.
"""
from __future__ import annotations

import io
import sys
from typing import Iterable

from tqdm import tqdm

__all__ = ["bar", "where"]


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (JupyterLab, papermill), not in a terminal IPython or plain Python."""
    shell = sys.modules.get("IPython")
    if shell is None:
        return False
    ip = shell.get_ipython()
    return ip is not None and hasattr(ip, "kernel")


def where() -> str:
    """Where a bar would go now: ``notebook``, ``terminal`` (stderr is a tty) or ``none``."""
    if _in_kernel():
        return "notebook"
    return "terminal" if sys.stderr.isatty() else "none"


class _DisplayLine(io.TextIOBase):
    """A file for tqdm that shows the last line written as one notebook output, updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self._handle = None

    def write(self, text: str) -> int:
        line = text.replace("\r", "\n").rstrip("\n").rsplit("\n", 1)[-1]
        if line.strip():  # tqdm clears a line with blanks before it closes: keep the last state instead
            from IPython.display import display

            data = {"text/plain": line}
            if self._handle is None:
                self._handle = display(data, raw=True, display_id=True)
            else:
                self._handle.update(data, raw=True)
        return len(text)

    def flush(self) -> None:
        pass


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str | None = None,
        unit: str = "it", show: bool | None = None, leave: bool = True, **kwargs) -> tqdm:
    """A tqdm bar for a long step (``show``: None decides by ``where()``; False draws nothing).

    In a notebook the bar is one text line of 80 characters (the book's code width), refreshed at most
    twice a second; on a terminal, tqdm's usual bar on stderr. Use it as tqdm: iterate, or ``update`` / ``set_postfix_str`` and ``close``.
    """
    place = where() if show is None or show else "none"
    if show and place == "none":
        place = "terminal"
    if place == "notebook":
        return tqdm(iterable, total=total, desc=desc, unit=unit, file=_DisplayLine(), ncols=80, ascii=False,
                    mininterval=0.5, leave=True, **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=place == "none", dynamic_ncols=True,
                leave=leave, **kwargs)

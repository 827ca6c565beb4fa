"""Where the repository's folders are (absolute paths), and how a path is shown relative to the repository.

Why: papermill runs a notebook's kernel in the caller's working directory and JupyterLab in the
notebook's own, so relative paths break one of them (STYLE.md section 4).
"""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"
NOTEBOOKS = ROOT / "notebooks"
DATA = ROOT / "data"
RUNS = ROOT / "runs"


def rel(path: str | Path) -> str:
    """``path`` relative to the repository root where it lies inside it (for captions, logs and commands)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)

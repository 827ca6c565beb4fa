"""Absolute paths of the repository's folders.

Why: papermill runs a notebook's kernel in the caller's working directory and JupyterLab in the
notebook's own, so relative paths break one of them (STYLE.md section 4).
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
FIGURES = ROOT / "figures"
NOTEBOOKS = ROOT / "notebooks"
DATA = ROOT / "data"
RUNS = ROOT / "runs"

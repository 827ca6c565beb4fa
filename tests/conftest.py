import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/problems.py
# One intra-op thread for the whole suite: its tensors are tiny, so a second thread only adds
# synchronisation, and on a shared 2-core machine two threads spin against the other work (with two,
# test_implicit.py::test_gradcheck_float64 took 22 s beside a training campaign; with one, 3 s).
# Tests that need more set it themselves and restore it.
torch.set_num_threads(1)

# Under CI (CI=true, which .ci/run exports) every extra of .[all] is installed, so a test that would skip
# for a missing package or a missing git history fails instead: a failed install must not pass as skips.
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def importorskip(name: str, reason: str | None = None):
    """``pytest.importorskip``, except under CI, where a module that does not import is a failure."""
    if not CI:
        return pytest.importorskip(name, reason=reason)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.fail(f"CI=true and {name} does not import ({type(exc).__name__}: {exc}); CI installs .[all], "
                    f"so this is a failed install, not a skip{f' ({reason})' if reason else ''}", pytrace=False)


def skip_unless_ci(reason: str):
    """``pytest.skip``, except under CI, where whatever made the test want to skip is a failure."""
    if CI:
        pytest.fail(f"CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def skip_while_runs_change():
    """Skip (fail under CI) while ``results/runs/`` has uncommitted changes: a running campaign copies a checkpoint
    and its logs there every few minutes, so a file written from them (``results/trained_models.md``,
    ``results/table_1_standing.md``) is checked on a settled tree: CI's clean checkout, or right after
    ``scripts/commit_campaign_progress.sh``. Outside a git checkout the check runs."""
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(["git", "status", "--porcelain", "--", "results/runs"], cwd=root, capture_output=True,
                           text=True)
    if found.returncode == 0 and found.stdout.strip():
        skip_unless_ci("results/runs/ has uncommitted changes (a campaign is writing it): checked on a clean checkout")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""JupyterLab as a user meets it: a real server on 127.0.0.1 opens notebooks/*.py as notebooks (the
repository's own default-viewer setting), and saving them back unchanged leaves git clean."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import importorskip
from mdeq.engine import paths

importorskip("jupyterlab", reason="JupyterLab is installed by the 'notebooks' extra")
importorskip("jupytext", reason="jupytext is installed by the 'notebooks' extra")

TOKEN = "mdeq-test-token"
SETTINGS = ".jupyter/lab/user-settings"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _served_port(runtime, proc) -> int | None:
    """The port the server listens on, from the server-info file it writes once listening (jpserver-<pid>.json):
    if the port asked for was taken in the meantime, the server moved to another one (``port_retries``)."""
    info = runtime / f"jpserver-{proc.pid}.json"
    try:
        return int(json.loads(info.read_text())["port"])
    except (OSError, ValueError, KeyError):
        return None


def _git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _api(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"token {TOKEN}",
                                                                           "Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode(),
                                 method="GET" if body is None else "PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


@pytest.fixture()
def lab(tmp_path):
    """A copy of the notebooks and the Jupyter settings in a fresh git repository, served by JupyterLab."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(paths.NOTEBOOKS, repo / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    shutil.copytree(paths.ROOT / ".jupyter", repo / ".jupyter")
    for name in ("jupytext.toml", ".gitignore"):
        shutil.copyfile(paths.ROOT / name, repo / name)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")
    runtime = tmp_path / "runtime"  # the server-info file lands here, not in the user's runtime folder
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
                             f"--port={_free_port()}", "--ip=127.0.0.1", f"--IdentityProvider.token={TOKEN}",
                             f"--ServerApp.root_dir={repo}", f"--LabApp.user_settings_dir={SETTINGS}"],
                            cwd=repo, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime)})
    deadline = time.monotonic() + 300  # a cold start beside a training campaign on 2 cores takes tens of seconds
    while True:
        port = _served_port(runtime, proc)
        try:
            if port is not None:
                _api(port, "/api/status")
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield repo, port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_py_files_open_as_notebooks_and_an_unchanged_save_keeps_git_clean(lab):
    repo, port = lab
    settings = _api(port, "/lab/api/settings/@jupyterlab/docmanager-extension:plugin")
    assert settings["settings"]["defaultViewers"]["python"] == "Jupytext Notebook"
    news = _api(port, "/lab/api/settings/@jupyterlab/apputils-extension:notification")["settings"]
    assert news["fetchNews"] == "false" and news["checkForUpdates"] is False  # no news prompt, no network
    names = sorted(p.name for p in (repo / "notebooks").glob("*.py"))
    assert len(names) == 6  # the tutorial (00) and the five paper notebooks
    for name in names:
        model = _api(port, f"/api/contents/notebooks/{name}?type=notebook&content=1")
        assert model["type"] == "notebook" and len(model["content"]["cells"]) > 3
        tags = [c["metadata"].get("tags", []) for c in model["content"]["cells"]]
        assert ["parameters"] in tags, name  # papermill's parameters cell survives the round trip
        _api(port, f"/api/contents/notebooks/{name}", {"type": "notebook", "format": "json",
                                                       "content": model["content"]})
    assert (repo / "notebooks" / ".ipynb_checkpoints").is_dir()  # written by the saves, and ignored
    assert _git(repo, "status", "--porcelain") == ""

"""Progress bars: one output line updated in place in a notebook, nothing in a log file, tqdm on a terminal."""
import IPython.display

from mdeq.engine import progress


class _Handle:
    def __init__(self, shown):
        self.shown = shown

    def update(self, data, raw=False):
        self.shown.append(("update", data["text/plain"]))


def test_notebook_bar_is_one_output_that_ends_in_its_final_state(monkeypatch):
    shown = []

    def display(data, raw=False, display_id=False):
        assert raw and display_id
        shown.append(("display", data["text/plain"]))
        return _Handle(shown)

    monkeypatch.setattr(IPython.display, "display", display)
    monkeypatch.setattr(progress, "where", lambda: "notebook")
    with progress.bar(total=3, desc="smoke training", unit="run") as b:
        for label in ("MDEQ-small", "ResNet-18", "ANODE"):
            b.set_postfix_str(label)
            b.update(1)
    assert [kind for kind, _ in shown].count("display") == 1  # one output, then updates of it
    final = shown[-1][1]
    assert final.startswith("smoke training: 100%") and "3/3" in final and "ANODE" in final
    assert "\r" not in final and "\n" not in final


def test_no_bar_where_nobody_looks(monkeypatch, capsys):
    monkeypatch.setattr(progress, "where", lambda: "none")
    b = progress.bar(range(3), desc="x")
    assert b.disable and list(b) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_terminal_bar_writes_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress, "where", lambda: "terminal")
    assert list(progress.bar(range(3), desc="epoch 0")) == [0, 1, 2]
    assert "epoch 0: 100%" in capsys.readouterr().err
    assert progress.bar(range(2), show=False).disable  # show=False wins everywhere


def test_where_outside_a_kernel_is_not_notebook():
    assert progress.where() in ("terminal", "none")

"""The README: its results table is what ``python -m mdeq.reproduce --readme`` writes from the committed tables,
it stays a short front page, and every page it links is a page of the book.

``mdeq.paper.report.readme`` reads ``results/table_*.csv`` only; the tests below give it small hand-written
tables in a temporary folder, then check the committed README against the committed tables.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import yaml

from mdeq.engine import paths
from mdeq.paper.report import readme
from mdeq import reproduce

ROOT = paths.ROOT
DOCS = ROOT / "docs"
MAX_WORDS = 1300  # "at most about 1,200": the front page; everything else is a page of the book
COLUMNS = ["table", "setting", "row", "metric", "paper", "paper_std", "ours", "ours_std", "delta", "paper_params",
           "ours_params", "ours_source", "status"]
CPU = "full profile; data: CIFAR-10 (JPEG-q75 re-encoded); hardware: CPU (AMD EPYC, 2 threads)"


def _write_csv(path: Path, rows: list[dict], columns=COLUMNS) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{c: r.get(c, "") for c in columns} for r in rows])


def _table1_rows(mdeq_ours="76.36", mdeq_status="1 run; unfinished: epoch 25 of 50") -> list[dict]:
    common = {"table": "Table 1", "setting": "without data augmentation", "metric": "test accuracy (%)"}
    return [
        {**common, "row": "Neural ODEs [18]", "paper": "53.7", "paper_std": "0.2", "ours": "not run yet",
         "paper_params": "172000", "ours_source": "not run yet", "status": "not run yet"},
        {**common, "row": "Aug. Neural ODEs [18]", "paper": "60.6", "paper_std": "0.4", "ours": "not run yet",
         "paper_params": "172000", "ours_source": "not run yet", "status": "not run yet"},
        {**common, "row": "Single-stream DEQ [5]", "paper": "82.2", "paper_std": "0.3",
         "ours": "no epoch evaluated yet", "paper_params": "170000", "ours_source": CPU,
         "status": "1 run; unfinished: epoch 0 of 50"},
        {**common, "row": "ResNet-18 [26] [Explicit]", "paper": "81.6", "paper_std": "0.3", "ours": "68.71",
         "delta": "-12.89", "paper_params": "170000", "ours_source": CPU, "status": "1 run"},
        {**common, "row": "MDEQ-small (ours)", "paper": "87.1", "paper_std": "0.4", "ours": mdeq_ours,
         "paper_params": "170000", "ours_source": CPU, "status": mdeq_status},
    ]


@pytest.fixture
def results(tmp_path) -> Path:
    """A results/ folder holding only a small Table 1."""
    folder = tmp_path / "results"
    folder.mkdir()
    _write_csv(folder / "table_1_cifar10.csv", _table1_rows())
    return folder


def _line(table: str, item: str) -> list[str]:
    """The cells of the table line whose item contains ``item``."""
    found = [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()
             if line.startswith("| ") and item in line]
    assert len(found) == 1, (item, found)
    return found[0]


def test_one_line_per_row_with_where_ours_stands(results):
    table = readme.results_table(results)
    assert _line(table, "ResNet-18") == ["Table 1, without augmentation: ResNet-18 (170K)", "81.6 ± 0.3", "68.71",
                                         "finished, 1 run, on CPU"]
    assert _line(table, ": MDEQ-small") == ["Table 1, without augmentation: MDEQ-small (170K)", "87.1 ± 0.4", "76.36",
                                          "epoch 25 of 50, 1 run, on CPU"]
    # a started run without a number shows none, never the paper's
    assert _line(table, "Single-stream") == ["Table 1, without augmentation: Single-stream DEQ (170K)",
                                             "82.2 ± 0.3", "-", "started, no epoch evaluated yet, 1 run, on CPU"]
    # rows not run yet share one line
    assert _line(table, "Neural ODEs (172K) / Aug. Neural ODEs (172K)")[1:] == ["53.7 ± 0.2 / 60.6 ± 0.4", "-",
                                                                              "not run yet"]
    # results first, then started runs, then what is not run yet
    order = [i for i, line in enumerate(table.splitlines()) if line.startswith("| Table 1")]
    items = [table.splitlines()[i] for i in order]
    assert "ResNet-18" in items[0] and "Single-stream" in items[2] and "not run yet" in items[3]
    assert "Metrics: Table 1: CIFAR-10 test accuracy (%)" in table
    assert "Data behind ours: CIFAR-10 (JPEG-q75 re-encoded)." in table
    assert '"best"' not in table  # these tables have no best-epoch column: nothing to explain


def test_the_best_epoch_stands_beside_ours_labelled(tmp_path):
    rows = _table1_rows()
    rows[3].update(ours_best="69.6", ours_best_epoch="11")  # ResNet-18: final 68.71, best epoch 11
    rows[4].update(ours_best="76.99", ours_best_epoch="31")
    (tmp_path / "results").mkdir()
    _write_csv(tmp_path / "results" / "table_1_cifar10.csv", rows, COLUMNS + ["ours_best", "ours_best_epoch"])
    table = readme.results_table(tmp_path / "results")
    assert _line(table, "ResNet-18")[2] == "68.71 (best: 69.60, epoch 11)"
    assert _line(table, ": MDEQ-small")[2:] == ["76.36 (best: 76.99, epoch 31)", "epoch 25 of 50, 1 run, on CPU"]
    assert _line(table, "Single-stream")[2] == "-"  # no number: no best either
    assert '"best" is the best evaluated epoch, for reference only' in table


def test_missing_tables_and_measurements_say_not_run_yet(results):
    rows = readme.results_rows(results)
    by_item = {r["item"]: r for r in rows}
    assert by_item["table_2_imagenet"]["status"] == "not run yet"
    for label in readme.FIGURE_ROWS.values():
        assert by_item[label]["ours"] == "-" and by_item[label]["status"] == "not run yet"


def test_a_figure_row_is_read_by_its_key(results):
    columns = ["table", "setting", "row", "key", "metric", "paper", "ours", "delta", "paper_note", "ours_source",
               "status"]
    _write_csv(results / "table_fig4b_runtime_memory.csv", [
        {"table": "Fig. 4b", "row": "training time MDEQ / ResNet-101", "key": "mdeq_slowdown_vs_resnet101",
         "paper": "2.7", "ours": "1.708", "ours_source": CPU, "status": "measured"}], columns)
    _write_csv(results / "table_fig5_convergence.csv", [
        {"table": "Figs. 5-6", "setting": "Cityscapes", "row": "Broyden, initial weights", "key": "broyden_final",
         "paper": "100", "ours": "> 150 (not reached)", "ours_source": CPU, "status": "measured"},
        {"table": "Figs. 5-6", "setting": "CIFAR-10", "row": "Broyden, trained, epoch 12 of 50, step 4900",
         "key": "broyden_final", "paper": "30", "ours": "10", "ours_source": CPU, "status": "measured"}], columns)
    table = readme.results_table(results)
    assert _line(table, "training time, MDEQ / ResNet-101")[1:] == ["2.7", "1.71", "measured, on CPU"]
    assert _line(table, "Fig. 5: CIFAR-10")[1:] == ["30", "10", "measured, weights of epoch 12 of 50, on CPU"]


def test_write_replaces_only_the_block_and_a_new_epoch_makes_the_readme_stale(tmp_path, results):
    page = tmp_path / "README.md"
    page.write_text(f"# Title\n\nbefore\n\n{readme.START}\nold table\n{readme.END}\n\nafter\n")
    assert readme.write(page, results) is True
    text = page.read_text()
    assert text.startswith("# Title\n\nbefore\n\n") and text.endswith(f"{readme.END}\n\nafter\n")
    assert "old table" not in text and "| 87.1 ± 0.4 | 76.36 |" in text
    assert readme.write(page, results) is False and page.read_text() == text  # idempotent
    # the campaign logs another epoch and the notebooks redraw Table 1: the committed README is now stale
    _write_csv(results / "table_1_cifar10.csv", _table1_rows("76.9", "1 run; unfinished: epoch 26 of 50"))
    assert readme.render(page, results) != text
    assert "| 87.1 ± 0.4 | 76.9 | epoch 26 of 50, 1 run, on CPU |" in readme.render(page, results)


def test_the_markers_must_be_there_once_each():
    with pytest.raises(ValueError, match="results-table:start"):
        readme.replace_block("no markers here", "table")
    with pytest.raises(ValueError, match="once each"):
        readme.replace_block(f"{readme.END}\n{readme.START}", "table")
    with pytest.raises(ValueError):
        readme.replace_block(f"{readme.START}{readme.START}{readme.END}", "table")


def test_the_reproduce_command_writes_the_table(tmp_path, results, monkeypatch):
    page = tmp_path / "README.md"
    page.write_text(f"{readme.START}\n{readme.END}\n")
    monkeypatch.setattr(readme, "README", page)
    monkeypatch.setattr(readme, "RESULTS", results)
    # it also writes the files the pages include: here into tmp_path, never into the repository
    monkeypatch.setattr(reproduce.standing, "STANDING", tmp_path / "table_1_standing.md")
    monkeypatch.setattr(reproduce.trained, "CHECKPOINT_TABLE", tmp_path / "trained_models.md")
    assert reproduce.main(["--readme"]) == 0
    assert "| 87.1 ± 0.4 | 76.36 |" in page.read_text()
    assert "| run | epochs |" in (tmp_path / "table_1_standing.md").read_text()
    assert "| run | config (model) |" in (tmp_path / "trained_models.md").read_text()


def test_the_committed_readme_table_is_what_the_command_writes():
    """A campaign epoch or a redrawn table without the README regenerated fails here."""
    committed = readme.README.read_text()
    expected = readme.render()
    assert committed == expected, (
        f"README.md's results table differs from what results/table_*.csv give: run `{readme.COMMAND}` "
        "(or `python -m mdeq.reproduce --profile logs`, which ends with it) and commit README.md")


def test_the_readme_is_a_short_front_page():
    words = len(readme.README.read_text().split())  # what `wc -w README.md` counts
    assert words <= MAX_WORDS, f"README.md has {words} words; move detail into a docs/ page of the book"
    text = readme.README.read_text()
    # the two set-up commands, the second being the one CI runs
    assert 'pip install -e ".[all]" && python -m mdeq.reproduce --profile smoke' in text
    assert "\npython -m pytest -q " in text
    assert "\npython -m pytest -q\n" in (ROOT / ".ci" / "run").read_text()


def _links(text: str) -> list[str]:
    """Relative link targets of a Markdown text (no URLs, no anchors)."""
    return [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def _toc_files() -> set[str]:
    files = set()

    def walk(node):
        if isinstance(node, dict):
            files.update([node["file"]] if "file" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load((reproduce.BOOK / "_toc.yml").read_text()))
    return files


def test_every_docs_page_is_a_page_of_the_book():
    """Each docs/NAME.md has its stub book/NAME.md (which includes it) in the book's table of contents."""
    toc = _toc_files()
    for page in sorted(DOCS.glob("*.md")):
        stub = reproduce.BOOK / page.name
        assert stub.is_file(), f"{page.name} has no book/{page.name}"
        assert f"```{{include}} ../docs/{page.name}" in stub.read_text(), stub
        assert page.stem in toc, f"book/_toc.yml does not list {page.stem}"


def test_every_link_of_the_readme_and_the_docs_pages_resolves():
    """README links point to files of the repository; docs pages link only to each other (a link out of docs/
    would not resolve in the book, where they are included from book/)."""
    missing = [t for t in _links(readme.README.read_text()) if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    for target in _links(readme.README.read_text()):
        if target.startswith("docs/"):
            assert target.endswith(".md") and (reproduce.BOOK / Path(target).name).is_file(), target
    for page in sorted(DOCS.glob("*.md")):
        for target in _links(page.read_text()):
            assert "/" not in target and (DOCS / target).is_file(), f"docs/{page.name} links to {target}"


def test_for_book_makes_docs_links_the_book_pages():
    text = "see [the campaign](docs/cpu_campaign.md) and [a notebook](notebooks/00_implicit_layers.ipynb)"
    assert readme.for_book(text) == ("see [the campaign](cpu_campaign.md) and "
                                     "[a notebook](notebooks/00_implicit_layers.ipynb)")
    staged = readme.for_book(readme.README.read_text())
    assert "](docs/" not in staged


def test_the_intro_page_includes_the_readme():
    intro = (reproduce.BOOK / "intro.md").read_text()
    assert intro.startswith("```{include} ../README.md")  # the built book (tests/test_book.py) checks its links

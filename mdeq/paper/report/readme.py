"""How does the README stay true: its results table written from ``results/table_*.csv``, its links read in the book?

Why generated: the results table is the README's first claim, and the committed tables change with every
epoch of a campaign; a table copied by hand went stale within a day. ``python -m mdeq.reproduce --readme``
rewrites the block between ``START`` and ``END`` in ``README.md``, ``python -m mdeq.reproduce --profile logs``
does the same at its end, and ``tests/test_readme.py`` fails, naming that command, when the committed README
differs from what the committed tables give. One short line per paper item: the paper's number, ours, and
where ours stands (``epoch 25 of 50``, ``not run yet``); the full rows, with data and hardware, stay in the
CSV files. Nothing here computes a number: every cell is read from a table the notebooks wrote
(``mdeq.paper.report.tables``), and a row without our log says "not run yet", never the paper's number.

The book's intro page includes the README (``book/intro.md``). A link ``docs/NAME.md`` in the README is a
page of the book there (``book/NAME.md`` includes ``docs/NAME.md``), so ``for_book`` rewrites it as
``NAME.md`` for the copy the book build reads.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from mdeq.engine import paths

__all__ = ["START", "END", "COMMAND", "README", "RESULTS", "PAPER_TABLE_FILES", "FIGURE_ROWS", "results_rows",
           "results_table", "replace_block", "render", "write", "for_book"]

START = "<!-- results-table:start -->"
END = "<!-- results-table:end -->"
COMMAND = "python -m mdeq.reproduce --readme"
README = paths.ROOT / "README.md"
RESULTS = paths.RESULTS
NOT_RUN = "not run yet"  # mdeq.paper.report.style.NOT_RUN; the CSV files hold this text
DASH = "-"

# The paper's tables, each shown by its first metric (Table 2's top-5 stays in its CSV file).
PAPER_TABLE_FILES = {"table_1_cifar10.csv": "CIFAR-10", "table_2_imagenet.csv": "ImageNet",
                     "table_3_cityscapes.csv": "Cityscapes"}
# The figures' rows the README shows: (file, setting, key) -> the item's label. Setting "" matches any.
FIGURE_ROWS = {
    ("table_fig4b_runtime_memory.csv", "", "mdeq_slowdown_vs_resnet101"):
        "Fig. 4b: training time, MDEQ / ResNet-101 (the paper's on a GPU)",
    ("table_fig4b_runtime_memory.csv", "", "mdeq_train_memory_saving_vs_resnets"):
        "Fig. 4b: training memory, MDEQ / ResNet-101 (the paper: saves > 60 %)",
    ("table_fig4b_runtime_memory.csv", "", "mdeq_small_speedup_vs_anode"):
        "Fig. 4b: training time, ANODE / MDEQ-small (the paper's on a GPU)",
    ("table_fig5_convergence.csv", "CIFAR-10", "broyden_final"):
        "Fig. 5: CIFAR-10, Broyden's f evaluations until the relative step is < 0.01 (the paper: \"within 30\")",
}


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _short(text: str) -> str:
    """A number as the README prints it: three significant digits, else the text as it is."""
    value = _number(text)
    return f"{value:.3g}" if value is not None else (text or DASH)


def _params(text: str | None) -> str:
    n = _number(text)
    if n is None:
        return ""
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _name(row: dict) -> str:
    """The row's model without the paper's citation marks: 'ResNet-18 [26] [Explicit]' -> 'ResNet-18 (170K)'."""
    name = re.sub(r"\s*\[[^\]]*\]", "", row["row"]).replace(" (ours)", "").strip()
    size = _params(row.get("paper_params"))
    model, comma, variant = name.partition(", ")  # 'MDEQ-small (170K), simplified injection (no stage0)'
    return f"{model} ({size}){comma}{variant}" if size else name


def _with_std(value: str, std: str | None) -> str:
    return f"{value} ± {std}" if std not in (None, "") else value


def _with_best(value: str, row: dict) -> str:
    """Ours with the best evaluated epoch beside it, where the table has one: '76.94 (best: 76.99, epoch 31)'."""
    best = _number(row.get("ours_best"))
    return f"{value} (best: {best:.2f}, epoch {row['ours_best_epoch']})" if best is not None else value


def _where(source: str | None) -> str:
    """'on CPU' when every machine behind a number is a CPU, else the hardware as the CSV gives it."""
    hardware = (source or "").partition("hardware: ")[2]
    if not hardware:
        return ""
    machines = [h.strip() for h in re.split(r";\s*(?=[A-Z])", hardware) if h.strip()]
    return "on CPU" if all(m.startswith("CPU") for m in machines) else f"on {hardware}"


def _data(source: str | None) -> str:
    """The data description of an ``ours_source`` text ('full profile; data: X; hardware: Y' -> 'X')."""
    return re.split(r";\s*", (source or "").partition("data: ")[2])[0].strip()


def _status(row: dict) -> str:
    """Where our number stands, from the CSV's status ('1 run; unfinished: epoch 25 of 50' -> 'epoch 25 of 50, 1 run')."""
    status = row.get("status") or NOT_RUN
    if status == NOT_RUN:
        return NOT_RUN
    parts = [p.strip() for p in status.split(";")]
    runs = next((p for p in parts if re.fullmatch(r"\d+ runs?", p)), "")
    unfinished = next((p.removeprefix("unfinished: ") for p in parts if p.startswith("unfinished: ")), "")
    if _number(row.get("ours")) is None:
        words = [f"started, {row.get('ours') or 'no number yet'}"]
    elif unfinished:
        words = [unfinished]
    elif "stopped early" in parts:
        words = ["stopped early"]
    else:
        words = ["finished"]
    words += [w for w in (runs, _where(row.get("ours_source"))) if w]
    return ", ".join(words)


def _paper_table_rows(path: Path, dataset: str) -> list[dict]:
    rows = _read(path)
    if not rows:
        return []
    metric = rows[0]["metric"]
    out = []
    settings = list(dict.fromkeys(r.get("setting", "") for r in rows))
    for setting in settings:
        group = [r for r in rows if r.get("setting", "") == setting and r["metric"] == metric]
        title = rows[0]["table"] + (f", {setting.replace('data augmentation', 'augmentation')}" if setting else "")
        with_number = [r for r in group if _number(r["ours"]) is not None]
        started = [r for r in group if _number(r["ours"]) is None and r["ours"] != NOT_RUN]
        not_run = [r for r in group if r["ours"] == NOT_RUN]
        for r in with_number + started:
            out.append({"item": f"{title}: {_name(r)}", "paper": _with_std(r["paper"] or DASH, r.get("paper_std")),
                        "ours": _with_best(_with_std(r["ours"], r.get("ours_std")), r) if r in with_number else DASH,
                        "status": _status(r), "metric": f"{rows[0]['table']}: {dataset} {metric}",
                        "data": _data(r.get("ours_source")) if r in with_number else ""})
        if not_run:
            out.append({"item": f"{title}: " + " / ".join(_name(r) for r in not_run),
                        "paper": " / ".join(_with_std(r["paper"] or DASH, r.get("paper_std")) for r in not_run),
                        "ours": DASH, "status": NOT_RUN, "metric": f"{rows[0]['table']}: {dataset} {metric}",
                        "data": ""})
    return out


def _figure_rows(results: Path) -> list[dict]:
    out = []
    for (name, setting, key), label in FIGURE_ROWS.items():
        path = results / name
        found = [r for r in (_read(path) if path.is_file() else [])
                 if r.get("key") == key and (not setting or r.get("setting") == setting)]
        if not found:
            out.append({"item": label, "paper": DASH, "ours": DASH, "status": NOT_RUN, "metric": "", "data": ""})
            continue
        r = found[0]
        measured = r.get("status") == "measured"
        epoch = re.search(r"epoch \d+ of \d+", r["row"])  # 'Broyden, trained, epoch 12 of 50, step 4900'
        status = ", ".join(w for w in ("measured" if measured else r.get("status") or NOT_RUN,
                                       f"weights of {epoch.group()}" if epoch else "", _where(r.get("ours_source")))
                           if w)
        out.append({"item": label, "paper": _short(r.get("paper")), "ours": _short(r.get("ours")) if measured else DASH,
                    "status": status, "metric": "", "data": _data(r.get("ours_source")) if measured else ""})
    return out


def results_rows(results: Path | None = None) -> list[dict]:
    """One dict per README line: item, paper, ours, status (and the metric and data the notes under it name)."""
    results = Path(results or RESULTS)
    rows = []
    for name, dataset in PAPER_TABLE_FILES.items():
        path = Path(results) / name
        if path.is_file():
            rows += _paper_table_rows(path, dataset)
        else:
            rows.append({"item": name.removesuffix(".csv"), "paper": DASH, "ours": DASH, "status": NOT_RUN,
                         "metric": "", "data": ""})
    return rows + _figure_rows(results)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def results_table(results: Path | None = None) -> str:
    """The Markdown block between ``START`` and ``END``: the table, the metrics and the data behind ours."""
    rows = results_rows(results)
    lines = [f"<!-- written by `{COMMAND}` from results/table_*.csv; edit those, not this block -->", "",
             "| paper item | paper | ours | where ours stands |", "| --- | --- | --- | --- |"]
    lines += [f"| {_cell(r['item'])} | {_cell(r['paper'])} | {_cell(r['ours'])} | {_cell(r['status'])} |"
              for r in rows]
    metrics = list(dict.fromkeys(r["metric"] for r in rows if r["metric"]))
    data = list(dict.fromkeys(r["data"] for r in rows if r["data"]))
    best = ("Ours is the last evaluated epoch's number (the final epoch's once a run is finished); \"best\" is "
            "the best evaluated epoch, for reference only (the released training script kept the best test epoch; "
            "the paper does not say which it reports). ") if any("(best: " in r["ours"] for r in rows) else ""
    lines += ["", "Metrics: " + "; ".join(metrics) + ". " + best + "Data behind ours: " + "; ".join(data) + "."]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what lies between ``START`` and ``END`` replaced by ``block``; both markers must be there once."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs the markers {START} and {END} once each, in that order")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def render(readme: Path | None = None, results: Path | None = None) -> str:
    """The README (default ``README``) as ``write`` would leave it, its table from ``results`` (``RESULTS``)."""
    return replace_block(Path(readme or README).read_text(), results_table(results))


def write(readme: Path | None = None, results: Path | None = None) -> bool:
    """Rewrite the README's results table from ``results``; True when the file changed."""
    readme = Path(readme or README)
    new = render(readme, results)
    if new == readme.read_text():
        return False
    readme.write_text(new)
    return True


def for_book(text: str) -> str:
    """The README as the book's intro page includes it: ``](docs/NAME.md`` links become the book's ``](NAME.md``."""
    return re.sub(r"\]\(docs/([A-Za-z0-9_-]+\.md)", r"](\1", text)

"""The book as a reader sees it (issue 14): built once from the committed notebooks (warnings are errors),
then every page's HTML is read with the standard library's ``html.parser``:

1. every notebook of ``mdeq.paper.parameters.NOTEBOOKS`` and every page of ``book/_toc.yml`` has its page;
2. every ``<img src>`` and every link to a local .png/.svg/.csv resolves to a file inside the HTML folder;
3. no page shows an error: no traceback output, no stderr output that says "Error";
4. every notebook page opens with the profile banner (``mdeq.paper.notebook.banner``), naming the profile of
   the committed notebooks (the default-parameter logs run, ``python -m mdeq.reproduce --profile logs
   --update-committed``);
5. every figure on a notebook page has its caption as page text right under it (the Markdown line
   ``*Figure (<name>).* <caption_text>`` that ``mdeq.paper.notebook.save_figure`` displays), and every figure the
   notebook owns (``mdeq.paper.notebook.FIGURE_OWNERS``) is on its page.

Each check is a function returning its problems as "<page>: <item>: <what>" lines, so that a failing test
names them all; the first tests check those functions on hand-written HTML and on a broken copy of the book.
The build takes about 15 s; everything else is milliseconds.
"""
from __future__ import annotations

import json
import importlib.util
import re
import shutil
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from conftest import CI, importorskip
from mdeq.paper import notebook, parameters
from mdeq.engine import paths
from mdeq import reproduce

# Under CI (conftest.CI) a missing jupyter-book is not skipped: the book fixture fails instead.
needs_book = pytest.mark.skipif(importlib.util.find_spec("jupyter_book") is None and not CI,
                                reason="jupyter-book (the 'book' extra) is not installed")
NOTEBOOKS = list(parameters.NOTEBOOKS)
# The committed notebooks are the default-parameter (logs) run (docs/running.md;
# `python -m mdeq.reproduce --profile logs --update-committed`).
COMMITTED_PROFILE = {name: parameters.PARAMETERS[name]["profile"][1] for name in NOTEBOOKS}
LINKED_FILES = (".png", ".svg", ".csv", ".json", ".jsonl", ".yaml")
TRACEBACK = "Traceback (most recent call last)"
PAPERMILL_ERROR = "An Exception was encountered at"  # papermill's error cell, were a failed run committed
VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
CAPTION = re.compile(r"Figure \((?P<name>[A-Za-z0-9_]+)\)\. (?P<text>.*?)Drawn by notebooks/(?P<notebook>[A-Za-z0-9_]+)"
                     r"\.ipynb from \S")

# ----------------------------------------------------------------------------------------------
# Reading a page: a small element tree from html.parser.

@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict
    parent: Element | None = field(default=None, repr=False)
    children: list = field(default_factory=list, repr=False)  # Element or str, in document order

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        """This element and every element under it, in document order."""
        yield self
        for child in self.children:
            if isinstance(child, Element):
                yield from child.iter()

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Element]:
        return [e for e in self.iter() if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)]

    def tokens(self):
        """The text (str) and the images (Element) under this element, in document order; no script or style."""
        for child in self.children:
            if isinstance(child, str):
                yield child
            elif child.tag not in ("script", "style"):
                if child.tag == "img":
                    yield child
                yield from child.tokens()

    def text(self) -> str:
        return normalize("".join(t for t in self.tokens() if isinstance(t, str)))

    def ancestor(self, cls: str) -> Element | None:
        node = self.parent
        while node is not None and cls not in node.classes:
            node = node.parent
        return node


class _TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {k: v or "" for k, v in attrs}, self.stack[-1])
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):  # close up to the matching open tag; ignore a stray one
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def normalize(text: str) -> str:
    """Whitespace collapsed, and Sphinx's typographic quotes back to ASCII ones."""
    text = text.translate(str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'}))
    return re.sub(r"\s+", " ", text).strip()


def markdown_plain(md: str) -> str:
    """The text a reader sees of a one-paragraph Markdown string such as mdeq.paper.notebook.banner's."""
    return normalize(re.sub(r"^\s*>\s?", "", md, flags=re.M).replace("**", "").replace("`", ""))


@dataclass
class Page:
    name: str  # relative to the HTML folder, e.g. notebooks/01_cifar10.html
    path: Path | None
    doc: Element

    @property
    def article(self) -> Element:
        """The page's content (sphinx-book-theme's <article>), without the navigation around it."""
        for element in self.doc.iter():
            if element.tag == "article":
                return element
        return self.doc

    def where(self, element: Element) -> str:
        """'code cell N' (1-based, among the page's code cells) of an element, or 'page text'."""
        cell = element if "cell" in element.classes else element.ancestor("cell")
        if cell is None:
            return "page text"
        return f"code cell {self.article.find_all(cls='cell').index(cell) + 1}"


def parse_page(text: str, name: str = "page.html", path: Path | None = None) -> Page:
    builder = _TreeBuilder()
    builder.feed(text)
    builder.close()
    return Page(name, path, builder.root)


def read_pages(html: Path) -> dict[str, Page]:
    """Every HTML page of a built book, by its path relative to the HTML folder."""
    pages = {}
    for path in sorted(html.rglob("*.html")):
        name = path.relative_to(html).as_posix()
        if not name.startswith(("_static/", "_sources/")):
            pages[name] = parse_page(path.read_text(encoding="utf-8"), name, path)
    return pages


def _snippet(text: str, n: int = 160) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


# ----------------------------------------------------------------------------------------------
# The checks: each returns "<page>: <item>: <what>" lines.

def toc_pages(toc: Path) -> list[str]:
    """The HTML pages book/_toc.yml lists (its root and every `file:` entry), e.g. notebooks/01_cifar10.html."""
    data = yaml.safe_load(Path(toc).read_text())
    files = [data["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in data.items() if k != "root"})
    return [re.sub(r"\.(md|ipynb)$", "", f) + ".html" for f in files]


def unresolved_files(page: Page, html: Path) -> list[str]:
    """Images, and links to files (LINKED_FILES: figures, tables, logs), that are not files inside the HTML
    folder ``html``."""
    problems = []
    root = Path(html).resolve()
    for element in page.doc.iter():
        if element.tag == "img":
            ref, what = element.attrs.get("src", ""), "image"
        elif element.tag == "a" and urlsplit(element.attrs.get("href", "")).path.lower().endswith(LINKED_FILES):
            ref, what = element.attrs["href"], "link"
        else:
            continue
        parts = urlsplit(ref)
        if what == "image" and parts.scheme == "data":
            continue  # embedded in the page
        if what == "link" and parts.scheme in ("http", "https"):
            continue  # a link to a file elsewhere, not one the book ships
        if not parts.path or parts.scheme or parts.netloc:
            problems.append(f"{page.name}: {what} {ref!r} ({page.where(element)}) is not a file of the book")
            continue
        target = (page.path.parent / unquote(parts.path)).resolve()
        if not target.is_relative_to(root):
            problems.append(f"{page.name}: {what} {ref!r} ({page.where(element)}) points outside the HTML folder")
        elif not target.is_file():
            problems.append(f"{page.name}: {what} {ref!r} ({page.where(element)}) is missing from the HTML folder")
    return problems


def error_outputs(page: Page) -> list[str]:
    """Error outputs (myst-nb's `output traceback`), stderr outputs that say "Error", traceback text in an
    output, and papermill's error cell."""
    problems = []
    for element in page.article.iter():
        cls = element.classes
        if "output" in cls and cls & {"traceback", "error"}:
            problems.append(f"{page.name}: {page.where(element)}: error output {_snippet(element.text())}")
        elif "output" in cls and "stderr" in cls and "Error" in (text := element.text()):
            problems.append(f"{page.name}: {page.where(element)}: stderr output with 'Error' {_snippet(text)}")
        elif "cell_output" in cls and TRACEBACK in (text := element.text()) and not any(
                "output" in e.classes and e.classes & {"traceback", "error", "stderr"} for e in element.iter()):
            problems.append(f"{page.name}: {page.where(element)}: a traceback in the output {_snippet(text)}")
    if PAPERMILL_ERROR in page.article.text():
        problems.append(f"{page.name}: papermill's error cell ({PAPERMILL_ERROR!r})")
    return problems


def banner_problems(page: Page, profile: str, expected: str | None = None) -> list[str]:
    """The page opens with the profile banner: a quote opening with "<Profile> profile" (``expected``: its
    whole text) before the page's first table or figure."""
    phrase = f"{profile.capitalize()} profile"
    quotes = page.article.find_all("blockquote")
    hits = [q for q in quotes if q.text().startswith(phrase)]
    if not hits:
        others = [_snippet(q.text(), 60) for q in quotes]
        return [f"{page.name}: banner: no quote opening with {phrase!r} (mdeq.paper.notebook.banner); "
                f"the page's quotes: {others or 'none'}"]
    banner, problems = hits[0], []
    if expected is not None and banner.text() != normalize(expected):
        problems.append(f"{page.name}: banner: reads {_snippet(banner.text())}, expected {_snippet(expected)}")
    order = {id(e): i for i, e in enumerate(page.article.iter())}
    before = [e for e in page.article.iter() if e.tag in ("img", "table") and order[id(e)] < order[id(banner)]]
    if before:
        problems.append(f"{page.name}: banner: comes after a {before[0].tag} ({page.where(before[0])})")
    return problems


def figure_captions(page: Page, notebook_name: str) -> tuple[list[str], list[str]]:
    """(the figures captioned on the page, problems): each image's caption is the text right under it (up to
    the next image or the end of its cell): "Figure (<name>). <caption> Drawn by notebooks/<notebook>.ipynb
    from <source>", with <name> a figure of this notebook."""
    owned = {n for n, owner in notebook.FIGURE_OWNERS.items() if owner == notebook_name}
    names, problems = [], []
    for image in page.article.find_all("img"):
        scope = image.ancestor("cell") or page.article
        tokens = list(scope.tokens())
        after = tokens[next(i for i, t in enumerate(tokens) if t is image) + 1:]
        following = []
        for token in after:
            if isinstance(token, Element):
                break
            following.append(token)
        text = normalize("".join(following))
        item = f"{page.name}: {page.where(image)}: image {image.attrs.get('src', '')!r}"
        match = CAPTION.match(text)
        if match is None:
            problems.append(f"{item}: no caption under it (save_figure's 'Figure (<name>). ... Drawn by "
                            f"notebooks/{notebook_name}.ipynb from ...'); the text under it: {_snippet(text, 100)}")
        elif match["name"] not in owned or match["notebook"] != notebook_name:
            problems.append(f"{item}: caption names figure {match['name']!r} of notebooks/{match['notebook']}"
                            f".ipynb, not one of {notebook_name}'s {sorted(owned)}")
        elif not match["text"].strip():
            problems.append(f"{item}: caption of {match['name']!r} has no text before 'Drawn by'")
        else:
            names.append(match["name"])
    return names, problems


# ----------------------------------------------------------------------------------------------
# The checks themselves, on hand-written HTML (each must be able to fail).

_CELL = '<div class="cell docutils container"><div class="cell_output docutils container">{}</div></div>'
_CAPTION = ("<p><em>Figure (fig8_cityscapes_examples).</em> Smoke run, not a reproduction: Cityscapes val images. "
            "Drawn by notebooks/04_cityscapes.ipynb from results/smoke/cityscapes_examples.</p>")


def _page(body: str, name: str = "notebooks/04_cityscapes.html", path: Path | None = None) -> Page:
    return parse_page(f"<html><head><meta charset='utf-8'><link rel='x' href='a.css'></head><body>"
                      f"<nav><img src='nav.png'></nav><article class='bd-article'>{body}</article></body></html>",
                      name, path)


def test_unresolved_files_names_the_missing_image_and_csv(tmp_path):
    html = tmp_path / "html"
    for folder in ("notebooks", "_images"):
        (html / folder).mkdir(parents=True)
    for name in ("html/_images/ok.png", "html/notebooks/nav.png", "secret.png"):
        (tmp_path / name).write_bytes(b"png")
    body = _CELL.format('<img src="../_images/ok.png"><img src="../_images/gone.png">'
                        '<img src="data:image/png;base64,AAAA"><img src="https://example.org/x.png">'
                        '<a href="../table.csv#x">csv</a><a href="https://example.org/t.csv">remote</a>'
                        '<a href="../../secret.png">outside</a><a href="../intro.html">page</a>')
    page = _page(body, path=html / "notebooks" / "04_cityscapes.html")
    problems = unresolved_files(page, html)
    assert problems == [
        "notebooks/04_cityscapes.html: image '../_images/gone.png' (code cell 1) is missing from the HTML folder",
        "notebooks/04_cityscapes.html: image 'https://example.org/x.png' (code cell 1) is not a file of the book",
        "notebooks/04_cityscapes.html: link '../table.csv#x' (code cell 1) is missing from the HTML folder",
        "notebooks/04_cityscapes.html: link '../../secret.png' (code cell 1) points outside the HTML folder",
    ]


def test_error_outputs_finds_tracebacks_and_stderr_errors():
    clean = _page(_CELL.format('<div class="output stream highlight-myst-ansi"><pre>done</pre></div>')
                  + _CELL.format('<div class="output stderr highlight-myst-ansi"><pre>UserWarning: x</pre></div>'))
    assert error_outputs(clean) == []
    broken = _page(
        _CELL.format('<div class="output traceback highlight-ipythontb"><pre>ValueError  Traceback (most recent '
                     'call last)</pre></div>')
        + _CELL.format('<div class="output stderr highlight-myst-ansi"><pre>RuntimeError: boom</pre></div>')
        + _CELL.format(f'<div class="output stream"><pre>{TRACEBACK}\n  File "x"</pre></div>')
        + f"<p>{PAPERMILL_ERROR} <code>In [3]</code></p>")
    problems = error_outputs(broken)
    assert [p.split(": ")[1] for p in problems[:3]] == ["code cell 1", "code cell 2", "code cell 3"], problems
    assert "error output" in problems[0] and "stderr output with 'Error'" in problems[1]
    assert "a traceback in the output" in problems[2] and "papermill's error cell" in problems[3]
    assert len(problems) == 4


def test_banner_and_captions_on_hand_written_pages():
    banner = markdown_plain(notebook.banner(notebook.Context("04_cityscapes", "smoke")))
    bold, rest = banner.split(". ", 1)  # as myst-nb renders "> **Smoke profile: ... .** Every number ..."
    good = _page("<h1>Cityscapes</h1>"
                 + _CELL.format(f"<blockquote><div><p><strong>{bold}.</strong>\n{rest}</p></div></blockquote>")
                 + _CELL.format("<table><tr><td>1</td></tr></table>")
                 + _CELL.format(f'<img src="a.png"><div class="output text_markdown">{_CAPTION}</div>'))
    assert banner_problems(good, "smoke", banner) == []
    assert figure_captions(good, "04_cityscapes") == (["fig8_cityscapes_examples"], [])
    # the wrong profile, a stale print instead of the banner, a banner under the table
    assert "no quote opening with 'Logs profile'" in banner_problems(good, "logs")[0]
    stale = _page(_CELL.format('<div class="output stream"><pre>profile smoke; draws: smoke</pre></div>'))
    assert banner_problems(stale, "smoke") == [
        "notebooks/04_cityscapes.html: banner: no quote opening with 'Smoke profile' (mdeq.paper.notebook.banner); "
        "the page's quotes: none"]
    late = _page(_CELL.format("<table></table>") + "<blockquote><p>Smoke profile: x</p></blockquote>")
    assert banner_problems(late, "smoke", "Smoke profile: y") == [
        "notebooks/04_cityscapes.html: banner: reads 'Smoke profile: x', expected 'Smoke profile: y'",
        "notebooks/04_cityscapes.html: banner: comes after a table (code cell 1)"]
    # an image without caption, one whose caption is under the next image, one of another notebook's figure
    bad = _page(_CELL.format(f'<img src="a.png"><img src="b.png">{_CAPTION}')
                + _CELL.format('<img src="c.png"><p>Figure (fig4a_cifar10_accuracy). Acc. Drawn by '
                               'notebooks/01_cifar10.ipynb from x.</p>')
                + _CELL.format('<img src="d.png">') + "<p>" + _CAPTION + "</p>")
    names, problems = figure_captions(bad, "04_cityscapes")
    assert names == ["fig8_cityscapes_examples"]
    assert [p.split(": ")[1:3] for p in problems] == [["code cell 1", "image 'a.png'"],
                                                      ["code cell 2", "image 'c.png'"],
                                                      ["code cell 3", "image 'd.png'"]], problems
    assert "no caption under it" in problems[0] and "caption names figure 'fig4a_cifar10_accuracy'" in problems[1]


def test_linked_files_are_staged_and_a_missing_one_is_named(tmp_path):
    book, root = tmp_path / "book", tmp_path / "root"
    (book / "notebooks").mkdir(parents=True)
    (root / "results" / "runs" / "r").mkdir(parents=True)
    (root / "results" / "runs" / "r" / "metrics.csv").write_text("epoch\n0\n")
    md = "Made from [`results/runs/r/metrics.csv`](../results/runs/r/metrics.csv); see [x](https://example.org)."
    nb = {"cells": [{"cell_type": "code", "source": "", "metadata": {}, "outputs": [
        {"output_type": "display_data", "metadata": {}, "data": {"text/markdown": [md]}}]}]}
    (book / "notebooks" / "01_cifar10.ipynb").write_text(json.dumps(nb))
    reproduce._stage_linked_files(book, [root])
    assert (book / "_extra" / "results" / "runs" / "r" / "metrics.csv").read_text() == "epoch\n0\n"
    nb["cells"][0]["outputs"][0]["data"]["text/markdown"] = [md.replace("runs/r/", "runs/gone/")]
    (book / "notebooks" / "01_cifar10.ipynb").write_text(json.dumps(nb))
    with pytest.raises(FileNotFoundError, match=r"notebooks/01_cifar10\.ipynb links to results/runs/gone/metrics\.csv"):
        reproduce._stage_linked_files(book, [root])


def test_toc_pages_lists_root_and_every_file():
    pages = toc_pages(reproduce.BOOK / "_toc.yml")
    assert pages[0] == "intro.html"
    reference = ("results", "table1_gaps", "cpu_campaign", "trained_models", "running", "full_protocol", "data",
                 "benchmarks", "step_time", "package", "layout", "paper_vs_released", "training_stability")
    assert set(pages) == {"intro.html", *(f"{name}.html" for name in reference),
                          *(f"notebooks/{n}.html" for n in NOTEBOOKS)}


# ----------------------------------------------------------------------------------------------
# The book of the committed notebooks, built once for the module.

@pytest.fixture(scope="module")
def book(tmp_path_factory) -> Path:
    importorskip("jupyter_book", reason="jupyter-book is the 'book' extra")  # under CI: a failure
    return reproduce.build_book(paths.NOTEBOOKS, tmp_path_factory.mktemp("book"), strict=True)


@pytest.fixture(scope="module")
def pages(book) -> dict[str, Page]:
    return read_pages(book)


def _notebook_page(pages, name) -> Page:
    page = pages.get(f"notebooks/{name}.html")
    assert page is not None, f"notebooks/{name}.html is missing from the book"
    return page


@needs_book
def test_book_builds_with_warnings_as_errors(book, pages):
    """The build (-W -n) succeeded; every notebook and every _toc.yml entry has its page, with a title."""
    expected = [f"notebooks/{n}.html" for n in NOTEBOOKS] + toc_pages(reproduce.BOOK / "_toc.yml")
    missing = sorted({p for p in expected if p not in pages})
    assert not missing, f"pages missing from the built book {book}: {missing}"
    untitled = sorted({p for p in expected if not [h.text() for h in pages[p].article.find_all("h1") if h.text()]})
    assert not untitled, f"pages without a title (h1): {untitled}"
    assert "Paper vs released code" in pages["paper_vs_released.html"].article.text()
    assert "mdeq-repro" in pages["intro.html"].article.text()


@needs_book
def test_every_image_and_linked_file_resolves(book, pages):
    problems = [p for page in pages.values() for p in unresolved_files(page, book)]
    assert not problems, "\n".join(problems)
    shown = sum(len(pages[f"notebooks/{n}.html"].article.find_all("img")) for n in NOTEBOOKS)
    assert shown > 0, "no image on any notebook page"


def caption_links(page: Page) -> tuple[int, list[str]]:
    """(how many captions end with "Made from ...", problems): each such caption of an output drawn from files
    links each named input under results/ (``manifest.made_from``: ``../results/...``), and the manifest."""
    count, problems = 0, []
    for para in page.article.find_all("p"):
        text = para.text()
        if "Made from " not in text:
            continue
        count += 1
        hrefs = [a.attrs.get("href", "") for a in para.find_all("a")]
        # what there is to open: the inputs less the absent ones, the folder listings and the manifest
        made = text[text.index("Made from "):]
        rest = re.sub(r"results/\S+ \(absent\)|the list of results/\S+|\(sha256 of each input: .*\)", "", made)
        named = re.findall(r"\S+\.(?:csv|jsonl?|yaml|png|jpg)\b", rest)
        if not any(h.startswith("../results/") and h.endswith("manifest.json") for h in hrefs):
            problems.append(f"{page.name}: {page.where(para)}: caption does not link results/manifest.json: "
                            f"{_snippet(made, 120)}")
        elif named and len(hrefs) < 1 + len(named):
            problems.append(f"{page.name}: {page.where(para)}: caption names {named[:3]} but links "
                            f"{len(hrefs) - 1} of {len(named)}: {_snippet(made, 120)}")
    return count, problems


@needs_book
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_caption_links_its_inputs(book, pages, name):
    """The caption under every figure and table names its inputs as links that the book ships (the file check
    above) and that JupyterLab opens from notebooks/ (same relative path)."""
    page = _notebook_page(pages, name)
    count, problems = caption_links(page)
    assert count > 0 and not problems, "\n".join(problems) or f"{page.name}: no 'Made from' caption"
    for a in page.article.find_all("a"):
        href = a.attrs.get("href", "")
        if href.startswith("../results/"):  # the same file in the book as beside notebooks/ in the repository
            shipped = (page.path.parent / href).resolve()
            assert shipped.read_bytes() == (paths.ROOT / href[3:]).read_bytes(), href


@needs_book
def test_a_deleted_image_is_reported(book, tmp_path):
    """The check above on a copy of the book with one figure image deleted."""
    copy = tmp_path / "html"
    shutil.copytree(book, copy, ignore=shutil.ignore_patterns("_static", "_sources"))
    page = read_pages(copy)["notebooks/04_cityscapes.html"]
    src = page.article.find_all("img")[0].attrs["src"]
    assert unresolved_files(page, copy) == []
    (copy / "notebooks" / src).unlink()
    problems = unresolved_files(page, copy)
    assert len(problems) == 1 and re.fullmatch(
        rf"notebooks/04_cityscapes\.html: image {re.escape(repr(src))} \(code cell \d+\) is missing from the HTML folder",
        problems[0]), problems


@needs_book
def test_no_page_shows_an_error(pages):
    toc = toc_pages(reproduce.BOOK / "_toc.yml")
    problems = [p for name in toc for p in error_outputs(pages[name])]
    assert not problems, "\n".join(problems)


@needs_book
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_page_opens_with_the_profile_banner(pages, name):
    profile = COMMITTED_PROFILE[name]
    # The smoke banner is fixed text; the logs and full ones depend on the logs and GPUs of the run.
    expected = markdown_plain(notebook.banner(notebook.Context(name, profile))) if profile == "smoke" else None
    problems = banner_problems(_notebook_page(pages, name), profile, expected)
    assert not problems, "\n".join(problems)


@needs_book
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_has_its_caption_as_text(pages, name):
    page = _notebook_page(pages, name)
    assert page.article.find_all("img"), f"{page.name}: no figure on the page"
    _, problems = figure_captions(page, name)
    assert not problems, "\n".join(problems)


@needs_book
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_every_figure_of_the_notebook_is_on_its_page(pages, name):
    """As many images as figures the notebook owns (one kind per committed profile), each under its caption
    once the captions are there (the caption test)."""
    page = _notebook_page(pages, name)
    owned = sorted(n for n, owner in notebook.FIGURE_OWNERS.items() if owner == name)
    # every profile draws one kind: the logs pages the real figures only, never the committed smoke copy
    kinds = 1
    images = len(page.article.find_all("img"))
    captioned, _ = figure_captions(page, name)
    missing = sorted(set(owned) - set(captioned)) if captioned else []
    assert images == kinds * len(owned) and not missing, (
        f"{page.name}: {images} figure image(s) for the {len(owned)} figure(s) {owned} of {name}"
        + (f"; no caption for {missing}" if missing else ""))


@needs_book
def test_long_output_lines_wrap_instead_of_running_off_the_page(book):
    css = book / "_static" / "outputs.css"
    assert css.is_file() and "pre-wrap" in css.read_text()
    for name in NOTEBOOKS:
        assert "_static/outputs.css" in (book / "notebooks" / f"{name}.html").read_text(), name

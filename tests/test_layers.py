"""The package's three layers import downwards only, and every module is one short file that says what it answers.

Layers, bottom up: the library (``mdeq.core``), the data sets (``mdeq.engine.data``), the rest of the
training engine (``mdeq.engine``), the reproduction of the paper (``mdeq.paper``), and the commands at the
top (``python -m mdeq.train``, ``mdeq.evaluate``, ``mdeq.campaign``, ``mdeq.reproduce``, ``mdeq.smoke``).
Two checks: every ``mdeq`` import in the source (also those inside functions) points to the module's own
layer or one below; and importing each layer's modules in a fresh interpreter loads nothing above it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mdeq"
ORDER = ("core", "data", "engine", "paper", "command")
MAX_LINES = 500


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a dotted module name inside ``mdeq``."""
    if module == "mdeq":  # the public API re-exports the library's names
        return "core"
    for prefix, name in (("mdeq.core", "core"), ("mdeq.engine.data", "data"), ("mdeq.engine", "engine"),
                         ("mdeq.paper", "paper")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "command"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every ``mdeq`` import in the file, wherever it sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "mdeq"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mdeq":
            if node.module == "mdeq":  # from mdeq import paths, notebook: each name may be a module
                found += [(node.lineno, f"mdeq.{a.name}" if (PACKAGE / a.name).exists()
                           or (PACKAGE / f"{a.name}.py").exists() else "mdeq") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_layers_are_what_the_tree_shows():
    assert {layer(_module(p)) for p in MODULES} == set(ORDER)
    assert layer("mdeq.core.solvers") == "core" and layer("mdeq.engine.data.cifar10") == "data"
    assert layer("mdeq.engine.loop") == "engine" and layer("mdeq.paper.report.tables") == "paper"
    assert layer("mdeq.train") == layer("mdeq.campaign") == "command"


def test_imports_point_down_only():
    wrong = []
    for path in MODULES:
        own = ORDER.index(layer(_module(path)))
        for line, target in _imports(path):
            if ORDER.index(layer(target)) > own:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({layer(_module(path))}) imports "
                             f"{target} ({layer(target)})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    """The AST walk finds imports inside functions and the ``from mdeq import name`` form."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mdeq.paper import runs\n    import mdeq.train\nfrom mdeq import engine\n")
    targets = sorted(t for _, t in _imports(probe))
    assert targets == ["mdeq.engine", "mdeq.paper", "mdeq.train"]
    engine = ORDER.index("engine")
    assert [t for t in targets if ORDER.index(layer(t)) > engine] == ["mdeq.paper", "mdeq.train"]


LAYERS_BELOW = ("core", "data", "engine", "paper")


def _layer_modules(below: str) -> list[str]:
    return [_module(p) for p in MODULES if layer(_module(p)) == below]


@pytest.fixture(scope="module")
def loaded_by_layer() -> dict[str, list[str]]:
    """The mdeq modules loaded after importing each layer in turn, bottom up, in one fresh interpreter.

    One process does what a process per layer would: a layer's imports do not depend on what is loaded before
    it, and whatever a lower layer loaded was checked at that layer against a stricter set (more layers above)."""
    code = ("import sys\n"
            f"for below, names in {[(below, _layer_modules(below)) for below in LAYERS_BELOW]!r}:\n"
            "    for name in names:\n"
            "        __import__(name)\n"
            "    print(below, *sorted(m for m in sys.modules if m == 'mdeq' or m.startswith('mdeq.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    return {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}


@pytest.mark.parametrize("below", LAYERS_BELOW)
def test_importing_a_layer_loads_nothing_above_it(below, loaded_by_layer):
    modules = _layer_modules(below)
    above = [name for name in ORDER[ORDER.index(below) + 1:]]
    lower = LAYERS_BELOW[:LAYERS_BELOW.index(below)]
    loaded = loaded_by_layer[below]
    assert set(modules) <= set(loaded)
    # packages on the way, for this layer and the ones imported before it
    parents = {m.rsplit('.', k)[0] for m in (*modules, *(n for b in lower for n in _layer_modules(b)))
               for k in range(1, m.count('.') + 1)}
    wrong = [m for m in loaded if layer(m) in above and m not in parents]
    assert not wrong, f"importing the {below} layer loads {wrong}"


def test_every_module_is_short_and_opens_with_what_it_answers():
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in MODULES
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines:\n" + "\n".join(long)
    missing = [str(p.relative_to(PACKAGE.parent)) for p in MODULES if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def test_the_layout_page_names_every_module():
    """docs/layout.md (the book's "Layout" page) lists every module, so a new file comes with its line there."""
    page = (PACKAGE.parent / "docs" / "layout.md").read_text()
    missing = [str(p.relative_to(PACKAGE.parent)) for p in MODULES if p.name != "__init__.py"
               and f"`{p.name}`" not in page]
    assert not missing, f"docs/layout.md does not name: {missing}"
    for folder in sorted({p.parent for p in MODULES if p.parent != PACKAGE}):
        assert f"`{folder.relative_to(PACKAGE.parent)}/`" in page or f"`{folder.name}/`" in page, folder

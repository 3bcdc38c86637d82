"""The import rule of docs/architecture.md: every module of ldm/ sits in a layer of the table there,
and its imports (module-level, function-level and TYPE_CHECKING ones alike) point to its own layer
or a lower one, never up, and never close a circle."""

import ast
import re
from pathlib import Path

import pytest

from helpers import ROOT

LDM = ROOT / "ldm"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def layer_table() -> dict[str, int]:
    """{"ldm.cli": 5, "ldm.build": 2, ...} from the fenced block under "## Layers" in
    docs/architecture.md: a line "N  ldm/pkg/  ldm/module.py ..." starts layer N, and lines after it
    without a number continue it (a package covers its submodules)."""
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Layers", 1)[1]
    block = section.split("```", 2)[1]
    table, layer = {}, None
    for line in block.splitlines():
        row = re.match(r"\s*(\d)\s", line)
        if row:
            layer = int(row.group(1))
        for path in re.findall(r"ldm/[\w/]*?(?:\.py|/)(?=\s|$)", line):
            table[path.removesuffix("/").removesuffix(".py").replace("/", ".")] = layer
    assert table, f"no layer table found under '## Layers' in {ARCHITECTURE}"
    return table


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(LDM.rglob("*.py"))}


def imported_modules(name: str, path: Path) -> set[str]:
    """The ldm modules that `name` imports anywhere in its file (`from .x import y` counts as ldm...x.y
    when y is a module, else as ldm...x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*base, node.module] if node.module else base)
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t == "ldm" or t.startswith("ldm."))
    found.discard(name)
    return found


def layer_of(name: str, table: dict[str, int]) -> int | None:
    """The layer of the longest table entry that is `name` or a package above it; the package's
    front door, ldm/__init__.py, sits above every layer."""
    if name == "ldm":
        return max(table.values()) + 1
    hits = [entry for entry in table if name == entry or name.startswith(entry + ".")]
    return table[max(hits, key=len)] if hits else None


def test_the_layer_table_lists_every_module():
    table = layer_table()
    unplaced = [name for name in MODULES if layer_of(name, table) is None]
    assert not unplaced, (f"add these modules (or their packages) to the layer table in {ARCHITECTURE.name}: "
                          f"{', '.join(unplaced)}")


def test_imports_never_climb_the_layers():
    table = layer_table()
    climbing = []
    for name, path in MODULES.items():
        own = layer_of(name, table)
        for target in sorted(imported_modules(name, path)):
            if target in MODULES and own is not None and layer_of(target, table) > own:
                climbing.append(f"{name} (layer {own}) imports {target} (layer {layer_of(target, table)})")
    assert not climbing, "imports that climb the layers of docs/architecture.md:\n  " + "\n  ".join(climbing)


def test_imports_close_no_circle():
    graph = {name: {t for t in imported_modules(name, path) if t in MODULES} for name, path in MODULES.items()}
    circles = _circles(graph)
    assert not circles, "import circles:\n  " + "\n  ".join(" -> ".join([*c, c[0]]) for c in circles)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a list."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("source, expected", [
    ("from ..pipeline import LDMPipeline\n", "ldm.pipeline"),
    ("def f():\n    from ..pipeline.loading import Loading\n", "ldm.pipeline.loading"),
    ("import ldm.images\n", "ldm.images"),
    ("from .. import images\n", "ldm.images"),
])
def test_the_checker_sees_module_and_function_level_imports(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imported_modules("ldm.convert.probe", path) == {expected}


def test_the_circle_finder_finds_circles_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _circles(graph) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []

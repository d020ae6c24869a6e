"""The package's layout keeps its promises: production code never imports a fake, the cloud half
never imports a device-only module, and no two modules import each other (not even lazily)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "edged"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every edged module `path` imports, at the top or inside a function (not under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("edged"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.startswith("edged"):
                # `from edged.x import y` imports the submodule y where there is one, else edged.x
                for a in child.names:
                    sub = PKG.parent / (child.module + "." + a.name).replace(".", "/")
                    if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
                        found.add(child.module + "." + a.name)
                    else:
                        found.add(child.module)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in mods and m != name} for name, path in mods.items()}


def test_the_graph_is_read():
    g = _graph()
    assert "edged.service.daemon" in g and "edged.delivery.outbox" in g["edged.service.daemon"]
    assert "edged.fakes.camera" in g and "edged.sources.camera.images" in g["edged.fakes.camera"]


def test_no_production_module_imports_a_fake():
    offenders = {m: sorted(i for i in deps if i == "edged.fakes" or i.startswith("edged.fakes."))
                 for m, deps in _graph().items() if not m.startswith("edged.fakes")}
    assert {m: d for m, d in offenders.items() if d} == {}


DEVICE_ONLY = ("edged.sources", "edged.stages", "edged.tpu", "edged.fakes", "edged.hardware", "edged.service.doctor")


def test_cloud_imports_no_device_only_module():
    g = _graph()
    seen, todo = set(), [m for m in g if m.startswith("edged.cloud")]
    while todo:  # everything the cloud modules reach, transitively
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    bad = sorted(m for m in seen if m.startswith(DEVICE_ONLY))
    assert bad == []


def test_no_import_circle():
    g = _graph()
    # A package's __init__ importing its own submodules is how it re-exports, not a circle; a
    # submodule importing its package's __init__ back would be.
    def edges(m):
        return {d for d in g[m] if not d.startswith(m + ".")}

    state: dict[str, int] = {}
    cycles = []

    def walk(m, stack):
        state[m] = 1
        stack.append(m)
        for d in edges(m):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                walk(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            walk(m, [])
    assert cycles == []


def test_architecture_doc_names_every_module_and_only_real_ones():
    import re

    doc = (PKG.parent / "docs" / "architecture.md").read_text()
    table = doc[doc.index("## Modules"):]
    missing = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).as_posix()
        if p.name == "__main__.py" or (p.name == "__init__.py" and rel.count("/") == 0):
            continue
        parent = p.parent.relative_to(PKG).as_posix() + "/"
        listed = f"`{rel}`" in table or (parent in table and p.name in table)
        if not listed:
            missing.append(rel)
    assert missing == []
    named = set(re.findall(r"`((?:[a-z_]+/)+[a-z_0-9]+\.py)`", table))
    assert named and sorted(n for n in named if not (PKG / n).exists()) == []

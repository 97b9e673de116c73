"""The house rules that can be checked mechanically: no import circles, at module or package level."""

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "clipguard"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """clipguard modules that ``name`` imports anywhere (top level or inside a function)."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != "clipguard" and t != name}
    return found


def room(name: str) -> str:
    """The package (or top-level module) a module belongs to: clipguard.models.clip -> models."""
    return name.split(".")[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one node (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_modules():
    graph = {name: imports_of(name) for name in MODULES if name != "clipguard"}
    # a package's __init__ re-exporting its own modules is not a circle of ideas
    graph = {n: {t for t in ts if not (MODULES[t].name == "__init__.py" and n.startswith(t + "."))}
             for n, ts in graph.items()}
    assert cycles(graph) == []


def test_no_import_circle_between_packages():
    graph: dict[str, set[str]] = {}
    for name in MODULES:
        if name == "clipguard":
            continue
        graph.setdefault(room(name), set()).update(room(t) for t in imports_of(name) if room(t) != room(name))
    assert cycles(graph) == []


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

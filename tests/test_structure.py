"""The package's shape, checked from its source: no import cycles (function-level imports included, since
those are how cycles hide), a core that knows nothing of DVC or KFP, and no code that only tests call."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fedcmi"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str) -> set[str]:
    """The fedcmi modules ``name`` imports when it runs: at module level or inside a function, not those
    under ``if TYPE_CHECKING``. ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in MODULES and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_import_graph_has_no_cycles():
    graph = {name: imports_of(name) for name in MODULES}
    assert sum(len(v) for v in graph.values()) > 100  # the walk sees the real graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_knows_nothing_of_kubeflow_or_dvc():
    for name, path in MODULES.items():
        for line in path.read_text().splitlines():
            assert not re.match(r"\s*(import|from)\s+(kfp|dvc|fedcmi_pipelines|fedcmi_components)\b", line), \
                f"{name}: {line.strip()}"


def test_every_top_level_function_is_used_outside_the_tests():
    """A function only tests call is dead weight that a reader must still understand."""
    sources = [p for folder in ("fedcmi", "components", "pipelines", "benchmarks", "docs")
               for p in sorted((ROOT / folder).rglob("*.py"))]
    text = {p: p.read_text() for p in sources}
    extra = "\n".join((ROOT / f).read_text() for f in ("pyproject.toml", "dvc.yaml"))
    unused = []
    for name, path in MODULES.items():
        for node in ast.parse(text[path]).body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("__"):
                continue
            word = re.compile(rf"\b{re.escape(node.name)}\b")
            uses = sum(len(word.findall(t)) for t in text.values()) + len(word.findall(extra))
            if uses < 2:  # its own definition is one
                unused.append(f"{name}.{node.name}")
    assert not unused, f"defined but never used outside tests: {unused}"


def test_the_wheel_lists_every_package():
    """The installed image holds only the packages pyproject names (editable installs hide a missing one)."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    renamed = {folder: name for name, folder in setup.get("package-dir", {}).items()}
    on_disk = set()
    for init in sorted(ROOT.glob("*/**/__init__.py")):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] in {"fedcmi", *renamed}:
            on_disk.add(".".join((renamed.get(parts[0], parts[0]), *parts[1:])))
    assert on_disk - set(setup["packages"]) == set(), "add these to [tool.setuptools] packages in pyproject.toml"

"""The package's import graph: no cycles, no stage importing another stage, no library module
importing the config assembly, the CLI or a stage. Imports inside functions count too (a lazy
import hides a cycle; it does not remove it). The graph comes from the source, nothing is imported."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "proxykd_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """{module: the proxykd_jax modules it imports}."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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


def test_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "proxykd_jax.context" in graph
    assert _cycles(graph) == []


def _is_stage(module: str) -> bool:
    return module.startswith("proxykd_jax.stages.")


def test_no_stage_imports_another_stage():
    bad = {m: sorted(e for e in edges if _is_stage(e)) for m, edges in import_graph().items() if _is_stage(m)}
    assert {m: e for m, e in bad.items() if e} == {}


@pytest.mark.parametrize(
    "forbidden", ["proxykd_jax.config", "proxykd_jax.cli", "proxykd_jax.stages", "proxykd_jax.plan"]
)
def test_library_packages_never_import_the_entry_points(forbidden):
    # (`proxykd plan` is a command like a stage: it runs the stages' config checks before compiling)
    entry = {"proxykd_jax.cli", "proxykd_jax.config", "proxykd_jax.__main__", "proxykd_jax.stages", "proxykd_jax.plan"}
    bad = {
        m: sorted(e for e in edges if e == forbidden or e.startswith(forbidden + "."))
        for m, edges in import_graph().items()
        if m not in entry and not _is_stage(m)
    }
    assert {m: e for m, e in bad.items() if e} == {}


def test_every_stage_module_is_thin():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "stages").glob("*.py")}
    assert set(sizes) >= {f"{s}.py" for s in ("collect", "prepare", "prior", "align", "posterior", "distill")}
    assert {name: n for name, n in sizes.items() if n > 120} == {}

"""The package's import graph has no cycle, counting imports inside functions too (issue
33): the engines sit below the driver and the commands, the contract below the engines."""

import ast
import pathlib

import visionbatch

PACKAGE = pathlib.Path(visionbatch.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(modules: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Each module's imports of the package's modules, wherever in the file they are."""
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visionbatch"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = found & modules.keys() - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (depth-first search), or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = _imports(_modules())
    assert "visionbatch.engines.base" in graph and len(graph) > 30  # the walk found the package
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_engines_do_not_reach_up_into_the_driver_or_the_commands():
    graph = _imports(_modules())
    above = {"visionbatch.driver", "visionbatch.job", "visionbatch.export", "visionbatch.api", "visionbatch.cli"}
    for engine in ("visionbatch.engines.base", "visionbatch.engines.local", "visionbatch.engines.ray"):
        assert not graph[engine] & above, (engine, graph[engine] & above)
    assert not graph["visionbatch.engines.base"] & {"visionbatch.engines.local", "visionbatch.engines.ray"}


def test_a_cycle_is_found_where_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

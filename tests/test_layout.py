"""The package's shape, checked from its source (no import runs): no loop between packages, errors
from errors.py, model code free of training code, one file name per concept."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ldm_train"
ERROR_NAMES = {"UserError", "check_choice", "check_keys"}
# File names that stand in several folders as the same kind of thing in parallel places.
PARALLEL = {"__init__.py", "__main__.py"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(name: str) -> str | None:
    """The ldm_train module a dotted import names (a module, or a name inside one)."""
    parts = name.split(".")
    while parts:
        base = PACKAGE.parent.joinpath(*parts)
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return None


def imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported ldm_train module, names imported from it)], every import in the file
    (at module level or inside functions)."""
    found = collections.defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [(alias.name, []) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [alias.name for alias in node.names]
                targets = [(node.module, names)]
                targets += [(f"{node.module}.{name}", []) for name in names]
            else:
                continue
            for name, names in targets:
                target = resolve(name) if name.startswith("ldm_train") else None
                if target and target not in (module, "ldm_train"):
                    found[module].append((target, names))
    return found


def package_of(module: str) -> str:
    """ldm_train.data.stream -> ldm_train.data; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def package_loops(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one package (Tarjan)."""
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                loops.append(sorted(group))

    for node in list(edges):
        if node not in index:
            visit(node)
    return loops


def test_no_loop_between_packages():
    edges = collections.defaultdict(set)
    for module, targets in imports().items():
        for target, _ in targets:
            if package_of(module) != package_of(target):
                edges[package_of(module)].add(package_of(target))
    assert package_loops(edges) == []


def test_no_loop_between_modules():
    edges = collections.defaultdict(set)
    for module, targets in imports().items():
        edges[module].update(target for target, _ in targets)
    assert package_loops(edges) == []


def test_errors_come_from_errors_py():
    wrong = [
        module
        for module, targets in imports().items()
        for target, names in targets
        if target != "ldm_train.errors" and ERROR_NAMES & set(names)
    ]
    assert wrong == []


def test_model_code_imports_nothing_from_training():
    """nets/ holds plain nn.Modules: they may use errors.py, nothing else of ours."""
    wrong = [
        (module, target)
        for module, targets in imports().items()
        if module.startswith("ldm_train.nets")
        for target, _ in targets
        if not target.startswith(("ldm_train.nets", "ldm_train.errors"))
    ]
    assert wrong == []


def test_one_file_name_per_concept():
    by_name = collections.defaultdict(list)
    for path in PACKAGE.rglob("*.py"):
        by_name[path.name].append(str(path.relative_to(PACKAGE)))
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    assert {name: paths for name, paths in shared.items() if name not in PARALLEL} == {}


def test_the_checks_can_fail():
    """The loop finder finds a loop, and the resolver knows our modules."""
    assert package_loops({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert resolve("ldm_train.errors.UserError") == "ldm_train.errors"
    assert any(target == "ldm_train.errors" for target, _ in imports()["ldm_train.config"])

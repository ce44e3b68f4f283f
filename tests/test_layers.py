"""The package imports only downward: every ``import`` in ``src/defectlab`` (lazy ones inside
functions included) goes to the same layer or a lower one, model families never import one
another, and no module imports itself back through a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "defectlab"

#: (layer, its groups) from the bottom up; a group is a top-level module or subpackage
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("__init__", "errors", "config", "ops", "base", "registry")),
    ("data", ("data",)),
    ("shared", ("components", "runs", "distributed")),
    ("models", ("detect", "segment", "synth")),
    ("workflows", ("training", "evaluate")),
    ("interfaces", ("api", "deploy", "app", "selection")),
    ("entry points", ("cli", "demo", "__main__")),
)
RANK = {group: rank for rank, (_, groups) in enumerate(LAYERS) for group in groups}
#: imports forbidden inside one layer (importer group, imported group): the model families
#: stay independent, and deployment uses the API's lower layers, not the API
SIDEWAYS_FORBIDDEN = {
    *((a, b) for a in ("detect", "segment", "synth") for b in ("detect", "segment", "synth")),
    ("deploy", "api"),
    ("deploy", "app"),
    ("api", "app"),
    ("api", "selection"),
    ("deploy", "selection"),
    ("components", "runs"),
    ("components", "distributed"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def group_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def imports_of(path: Path) -> set[str]:
    """Every defectlab module ``path`` imports, at module level or inside a function."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "defectlab")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != "defectlab":
                continue
            found.add(target)
            for alias in node.names:  # `from defectlab import api` imports a module
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))
                ).is_dir():
                    found.add(candidate)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_group_has_a_layer() -> None:
    groups = {group_of(m) for m in import_graph()}
    assert groups <= set(RANK), f"groups without a layer: {sorted(groups - set(RANK))}"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        source = group_of(module)
        for target in sorted(targets):
            group = group_of(target)
            if group == source:
                continue
            upward = RANK[group] > RANK[source]
            sideways = (source, group) in SIDEWAYS_FORBIDDEN
            if upward or sideways:
                bad.append(f"{module} -> {target}")
    return bad


def test_imports_go_only_downward() -> None:
    bad = layer_violations(import_graph())
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = import_graph()
    # the package root imports only errors; `from defectlab import X` reaches X, not a cycle
    graph = {m: {t for t in ts if t != "defectlab"} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("module", "target"),
    [
        ("defectlab.detect.memseg", "defectlab.segment.unet"),
        ("defectlab.segment.cam", "defectlab.detect.patchmemory"),
        ("defectlab.synth.procedural", "defectlab.api"),
        ("defectlab.deploy.onnx", "defectlab.api"),
        ("defectlab.data.io", "defectlab.components.features"),
    ],
)
def test_the_check_catches_a_forbidden_import(module: str, target: str) -> None:
    assert layer_violations({module: {target}}) == [f"{module} -> {target}"]

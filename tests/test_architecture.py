"""The package's layers, kept by a test: no import cycles, no layer reaching up, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftlab"
LEAVES = {"peftlab.errors", "peftlab.families", "peftlab.durable", "peftlab.assets", "peftlab.environment"}
# Each layer may import its own and the layers before it; the core is the package's top-level modules.
LAYERS = ["core", "peftlab.speed", "peftlab.training", "peftlab.serving", "peftlab.studies", "peftlab.api",
          "peftlab.cli"]
SIBLINGS_APART = {("peftlab.serving", "peftlab.training"), ("peftlab.training", "peftlab.serving")}
MAX_LINES = 380  # "no module over ~350 lines", with room for a docstring


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """peftlab modules `path` imports, at the top or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftlab"):
            found |= {f"peftlab.{a.name}" for a in node.names} if node.module == "peftlab" else {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("peftlab")}
    return found


def _graph() -> dict[str, set[str]]:
    graph = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}
    return {name: {d for d in deps if d in graph and d != name} for name, deps in graph.items()}


def _layer(module: str) -> int:
    if module in ("peftlab.__main__", "peftlab"):  # the entry points: the command line, `import peftlab`
        return len(LAYERS) - 1
    return next((i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")), 0)


def test_the_leaves_import_nothing_of_the_package():
    graph = _graph()
    assert {leaf: graph[leaf] for leaf in LEAVES if graph[leaf]} == {}


def test_no_layer_reaches_up_and_serving_and_training_stay_apart():
    wrong = []
    for module, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(module):
                wrong.append(f"{module} imports {dep} (a higher layer)")
            if (LAYERS[_layer(module)], LAYERS[_layer(dep)]) in SIBLINGS_APART:
                wrong.append(f"{module} imports {dep}")
    assert wrong == []


def test_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_every_error_is_a_peftlab_error_from_the_errors_module():
    defined = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and path.name != "errors.py":
                defined.append(f"{_module_name(path)}.{node.name}")
    assert defined == ["peftlab.serving.predictor.RequestError"]  # an HTTP answer, not a user's error


def test_modules_stay_small():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}

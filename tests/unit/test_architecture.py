"""The shape of the package: a deliberate public API, dependencies that point one way
(errors/types → io, processors → plugins → pipeline → config → batch, pick, daemon → sim → cli),
and no import cycle, including imports inside functions and under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import flybox

PACKAGE = Path(flybox.__file__).parent

#: Layers, lowest first: a module may import its own layer and the ones below, never above.
LAYERS: list[set[str]] = [
    {"errors", "types"},
    {"io", "processors"},
    {"plugins"},
    {"pipeline"},
    {"config"},
    {"batch", "pick", "daemon"},
    {"sim"},
    {"cli", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every flybox module → the flybox modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                found = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in found:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("flybox") and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(module: str) -> int:
    top = _top(module)
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer of this test: add its package to LAYERS")


def test_every_module_belongs_to_a_layer() -> None:
    for module in _imports():
        if module != "flybox":
            _layer(module)


def test_dependencies_point_one_way() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, targets in _imports().items()
        if module != "flybox"
        for target in targets
        if target != "flybox" and _layer(target) > _layer(module)
    ]
    assert wrong == []


#: The one processors module allowed to touch the file system: it chooses where numba keeps
#: compiled kernels (environment set-up when a kernel is defined, never data).
JIT_CACHE = PACKAGE / "processors" / "jit.py"


def test_processors_do_no_io_and_no_asyncio() -> None:
    for path in (PACKAGE / "processors").rglob("*.py"):
        if path == JIT_CACHE:
            continue
        tree = ast.parse(path.read_text())
        names = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert not names & {"asyncio", "pathlib", "shutil", "tempfile", "sqlite3"}, path
        assert not any(
            isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open"
            for node in ast.walk(tree)
        ), path


def test_no_import_cycle() -> None:
    graph = _imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if target == "flybox" or _top(target) == "":
                continue
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ that re-exports its modules is not a cycle with them.
    real = [c for c in cycles if not all(c[0].startswith(m) or m.startswith(c[0]) for m in c)]
    assert real == []


def test_public_api_is_honest() -> None:
    assert sorted(flybox.__all__) == sorted(["__version__", *flybox._API])
    assert len(set(flybox.__all__)) == len(flybox.__all__)
    for name in flybox.__all__:
        assert getattr(flybox, name) is not None, name
    assert set(flybox.__all__) <= set(dir(flybox))
    with pytest.raises(AttributeError):
        _ = flybox.no_such_name  # type: ignore[attr-defined]


def test_importing_flybox_imports_no_heavy_module() -> None:
    code = (
        "import sys, flybox; "
        "print(sorted(m for m in ('numpy', 'pandas', 'numba', 'pyfftw', 'pydantic') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_plugin_contract_is_exported_by_processors() -> None:
    import flybox.processors as processors

    for name in ("Micrograph", "ParticleStack", "StepSettings", "ParticleProcessor"):
        assert name in processors.__all__

"""The daemon's stages talk through seams: none imports the service, nothing hides a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import flybox.daemon

DAEMON = Path(flybox.daemon.__file__).parent


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(path.relative_to(DAEMON)), ast.parse(path.read_text(), str(path)))
        for path in sorted(DAEMON.rglob("*.py"))
    ]


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_daemon_module_imports_the_service() -> None:
    offenders = [
        name
        for name, tree in _modules()
        if name != "service.py" and "flybox.daemon.service" in _imports(tree)
    ]
    assert offenders == []


def test_no_daemon_module_hides_imports_under_type_checking() -> None:
    offenders = [
        name
        for name, tree in _modules()
        if any(
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for node in ast.walk(tree)
        )
    ]
    assert offenders == []


def test_intake_does_not_import_the_work_queue_and_work_does_not_import_intake_stage() -> None:
    modules = dict(_modules())
    assert not any(
        m.startswith("flybox.daemon.work.queue") for m in _imports(modules["intake/stage.py"])
    )
    for name in ("work/queue.py", "work/executor.py", "work/commit.py", "work/journal.py"):
        assert not any(m.startswith("flybox.daemon.intake.stage") for m in _imports(modules[name]))

"""Shared fixtures: where the real data lives, and how missing external components behave.

Integration tests skip when a component (RELION, mosquitto, prometheus, the shared data) is
absent, with the reason; under ``CI=true`` a missing component is a failure instead. The real
data are read in place from ../shared (never copied into the repository).
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_folder() -> Path:
    """``$FLYBOX_SHARED``, else ``../shared`` beside the checkout, else beside the repository
    this checkout was cloned from (a clone in a temporary folder, as CI checks are run)."""
    if "FLYBOX_SHARED" in os.environ:
        return Path(os.environ["FLYBOX_SHARED"])
    beside = REPO.parent / "shared"
    if beside.is_dir():
        return beside
    origin = subprocess.run(
        ["git", "-C", str(REPO), "config", "--get", "remote.origin.url"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    if origin and Path(origin).is_dir():
        cloned_from = Path(origin).resolve().parent / "shared"
        if cloned_from.is_dir():
            return cloned_from
    return beside


SHARED = _shared_folder()
REAL = SHARED / "data" / "real"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing_component(reason: str, *, module_level: bool = False) -> None:
    """Skip the calling test (or module), or fail it when running in CI."""
    if IN_CI:
        pytest.fail(f"required component missing in CI: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=module_level)


def require_module(name: str) -> Any:
    """Import an optional package (e.g. the ``[dask]`` extra) for a test module; skip the
    module without it, or fail under CI."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        missing_component(f"python package {name} is not installed", module_level=True)
        raise


def require_binary(name: str) -> str:
    """Absolute path of an external program, or skip/fail when it is not installed."""
    path = shutil.which(name)
    if path is None:
        missing_component(f"{name} is not installed")
        raise AssertionError  # unreachable
    return path


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-data folder (../shared/data/real)."""
    if not (REAL / "MANIFEST.md").is_file():
        missing_component(f"shared real data not found at {REAL}")
    return REAL


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Tests that run ``flybox.cli.main`` configure the root logger on pytest's captured
    stderr; put the logging set-up back afterwards so later tests do not log to a closed
    stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _checked_for_leaked_tasks(test: Callable[..., Awaitable[None]]) -> Callable[..., Any]:
    from tests.helpers.tasks import no_tasks_left

    @functools.wraps(test)
    async def checked(*args: Any, **kwargs: Any) -> None:
        await test(*args, **kwargs)
        await no_tasks_left()

    return checked


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under ``tests/integration/`` (real services, subprocesses, browsers) is
    ``slow``: the fast loop is ``pytest -m "not slow"``. Every async test fails when it leaves a
    task running (an owner that did not cancel and await what it started)."""
    integration = REPO / "tests" / "integration"
    for item in items:
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
        test = getattr(item, "obj", None)
        if inspect.iscoroutinefunction(test) and not hasattr(test, "hypothesis"):
            item.obj = _checked_for_leaked_tasks(test)  # type: ignore[attr-defined]


#: Debian's Chromium, which the browser tests drive through Playwright.
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium (``--no-sandbox`` as root), or skip/fail when it is not installed."""
    if not os.path.exists(CHROMIUM):
        missing_component(f"{CHROMIUM} is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield launched
        finally:
            launched.close()

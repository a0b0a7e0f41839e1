"""The leaked-task check every async test gets (tests/conftest.py wraps them)."""

from __future__ import annotations

import asyncio
import time

__all__ = ["no_tasks_left"]


async def no_tasks_left(timeout: float = 2.0) -> None:
    """Assert that no task but the current one is left (letting cancelled ones finish)."""
    current = asyncio.current_task()
    deadline = time.monotonic() + timeout
    while True:
        others = [task for task in asyncio.all_tasks() if task is not current]
        if not others:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"leaked tasks: {others}")
        await asyncio.sleep(0.02)

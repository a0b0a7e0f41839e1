"""The picker page in real headless Chromium, served by a real ``flybox pick serve``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.integration.pick.conftest import Served

pytestmark = pytest.mark.slow

ARTEFACTS = REPO / "tests" / "artefacts"


def _open(browser: Any, url: str) -> Any:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("window.flyboxPick.state.image !== null")
    return page


def _screen(page: Any, x: float, y: float) -> tuple[float, float]:
    box = page.locator("#canvas").bounding_box()
    sx, sy = page.evaluate("([x, y]) => window.flyboxPick.toScreen(x, y)", [x, y])
    return box["x"] + sx, box["y"] + sy


def _click(page: Any, x: float, y: float) -> None:
    page.mouse.click(*_screen(page, x, y))


def _saved(page: Any) -> None:
    page.evaluate("() => window.flyboxPick.state.saving")


def _picks_file(folder: Path, name: str) -> dict[str, Any]:
    from flybox.io.coords import read_coordinates
    from flybox.pick.store import PickStore  # noqa: F401 - the store's format is the contract

    table = read_coordinates(folder / f"{name}_manualpick.star")
    return {"xy": table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(), "table": table}


def test_user_picks_corrects_and_finds_everything_after_reload(
    served: Served, browser: Any
) -> None:
    from playwright.sync_api import expect

    page = _open(browser, served.url)
    expect(page.locator("#current-name")).to_have_text("mic0")
    expect(page.locator("#autopick")).to_be_disabled()

    truth = served.truth["mic0"]
    for x, y in truth[:18]:
        _click(page, x, y)
    _saved(page)
    expect(page.locator("#count-picks")).to_have_text("18")
    expect(page.locator("#sum-manual")).to_have_text("18")

    # Clicking a pick discards it (kept as discarded).
    _click(page, *truth[0])
    _saved(page)
    expect(page.locator("#count-picks")).to_have_text("17")
    expect(page.locator("#count-discarded")).to_have_text("1")

    # Dragging a pick moves it.
    start = _screen(page, *truth[1])
    page.mouse.move(*start)
    page.mouse.down()
    for step in range(1, 6):
        page.mouse.move(start[0] + 3 * step, start[1] + 2 * step)
    page.mouse.up()
    _saved(page)
    moved = page.evaluate("() => window.flyboxPick.state.items.map(p => [p.x, p.y])")
    assert truth[1].tolist() not in moved
    assert len(moved) == 17

    # Undo and redo the move.
    page.keyboard.press("Control+z")
    _saved(page)
    assert [round(v, 1) for v in truth[1]] in [
        [round(a, 1), round(b, 1)]
        for a, b in page.evaluate("() => window.flyboxPick.state.items.map(p => [p.x, p.y])")
    ]
    page.keyboard.press("Control+y")
    _saved(page)

    # The particle size is saved with the session.
    page.fill("#particle-size", "66")
    page.press("#particle-size", "Enter")
    expect(page.locator("#summary")).to_contain_text("particle 66 px")

    # Next micrograph with the keyboard, then autopick.
    page.locator("#canvas").focus()
    page.keyboard.press("n")
    expect(page.locator("#current-name")).to_have_text("mic1")
    expect(page.locator("#autopick")).to_be_enabled()
    page.keyboard.press("a")
    expect(page.locator("#message")).to_contain_text("proposals")
    _saved(page)
    proposals = page.evaluate(
        "() => window.flyboxPick.state.items.filter(p => p.origin === 'auto' && p.score >= 0.5)"
    )
    assert len(proposals) >= 20

    # Correct: discard a proposal, add a manual pick, then "Correct and next".
    _click(page, proposals[-1]["x"], proposals[-1]["y"])
    _saved(page)
    page.click("#correct")
    expect(page.locator("#current-name")).to_have_text("mic2")
    expect(page.locator("#message")).to_contain_text("proposals")
    _saved(page)
    page.wait_for_timeout(300)
    ARTEFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "pick.png"))
    docs_image = REPO / "docs" / "images" / "picker.png"
    if docs_image.parent.is_dir() and os.environ.get("FLYBOX_UPDATE_SCREENSHOT"):
        shutil.copy(ARTEFACTS / "pick.png", docs_image)

    # Reload: the session comes back where the user was.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#current-name")).to_have_text("mic2")
    expect(page.locator("#summary")).to_contain_text("particle 66 px")
    states = {
        li.get_attribute("data-name"): li.locator(".state").inner_text()
        for li in page.locator("#micrographs li").all()
    }
    assert states == {"mic0": "picked", "mic1": "corrected", "mic2": "picked"}
    page.locator("#micrographs li[data-name=mic0]").click()
    expect(page.locator("#current-name")).to_have_text("mic0")
    expect(page.locator("#count-picks")).to_have_text("17")
    expect(page.locator("#count-discarded")).to_have_text("1")

    session = json.loads((served.folder / "picking.json").read_text())
    assert session["particle_size"] == 66
    assert session["autopick_used"] is True
    assert session["discarded"] >= 2
    assert session["model_version"] >= 2  # retrained after the correction
    assert len(_picks_file(served.folder, "mic0")["xy"]) == 17


def test_stale_save_in_a_second_tab_is_refused_and_shown(served: Served, browser: Any) -> None:
    from playwright.sync_api import expect

    first = _open(browser, served.url)
    second = _open(browser, served.url)
    x, y = served.truth["mic0"][0]
    _click(first, x, y)
    _saved(first)
    _click(second, *served.truth["mic0"][1])
    _saved(second)
    expect(second.locator("#message")).to_contain_text("Not saved")
    expect(second.locator("#message")).to_contain_text("changed since")
    assert len(_picks_file(served.folder, "mic0")["xy"]) == 1
    second.click("#message button")
    expect(second.locator("#count-picks")).to_have_text("1")

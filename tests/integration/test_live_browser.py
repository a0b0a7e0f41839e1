"""The live session in real headless Chromium: the dashboard updates while micrographs are
committed, and /pick in the service corrects a micrograph (issue 13). Screenshots go to
docs/images/ (shown in the README)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flybox.io.mrc import write_micrograph
from tests.conftest import REPO
from tests.helpers.service import ServiceProcess, wait_for
from tests.integration.test_live_picking import (
    Api,
    committed_version,
    labelled_model,
    live_config,
    rows,
    synthetic,
)

pytestmark = pytest.mark.slow

IMAGES = REPO / "docs" / "images"


@pytest.fixture
def live(tmp_path: Path) -> Iterator[tuple[ServiceProcess, Api, Path, Path]]:
    model = tmp_path / "model.flypick"
    labelled_model(model)
    inputs, output = tmp_path / "Micrographs", tmp_path / "out"
    inputs.mkdir()
    for seed in range(4):
        write_micrograph(inputs / f"mic{seed:02d}.mrc", synthetic(seed).image, 1.0)
    config = live_config(tmp_path, inputs, output, model, learn=False)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    api = Api(config)
    try:
        wait_for(lambda: api.done() >= 4, 120, "4 micrographs committed")
        yield service, api, inputs, output
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    service.assert_no_leftovers()


def test_dashboard_draws_plots_and_thumbnails_and_follows_commits(
    live: tuple[ServiceProcess, Api, Path, Path], browser: Any
) -> None:
    from playwright.sync_api import expect

    _, api, inputs, _ = live
    page = browser.new_page(viewport={"width": 1440, "height": 1100})
    page.goto(api.base + "/")
    page.wait_for_selector("body[data-ready=true]")
    expect(page.locator("#session")).to_have_text("live")
    expect(page.locator("#c-done")).to_have_text("4")
    expect(page.locator(".thumb[data-loaded=true]")).to_have_count(4)
    assert int(page.locator(".thumb").first.get_attribute("data-picks") or 0) > 20
    assert page.locator("#p-particles circle").count() == 4
    assert page.locator("#p-latency circle").count() == 4
    page.wait_for_function("window.flyboxDashboard.connected")

    # Micrographs committed while the page is open arrive through the event stream.
    for seed in range(4, 8):
        write_micrograph(inputs / f"mic{seed:02d}.mrc", synthetic(seed).image, 1.0)
    page.wait_for_function("window.flyboxDashboard.updates >= 4", timeout=60_000)
    expect(page.locator("#c-done")).to_have_text("8", timeout=30_000)
    expect(page.locator(".thumb[data-loaded=true]")).to_have_count(8, timeout=30_000)
    assert page.locator("#p-particles circle").count() == 8
    assert page.locator(".thumb svg circle.auto").count() > 100
    # The main stream's count, labelled plainly, the small set's beside it; nothing failed,
    # so the failed · quarantined card is not red.
    counts = api.call("/api/status")[2]["particles"]
    assert 0 < counts["particles"] < 10_000  # shown as an integer (no "k")
    expect(page.locator("#c-particles-label")).to_have_text("particles")
    expect(page.locator("#c-particles")).to_have_text(str(counts["particles"]))
    small = f"particles_small {counts['particles_small']}"
    expect(page.locator("#c-particles-more")).to_have_text(small)
    expect(page.locator("#c-failed")).to_have_text("0 · 0")
    expect(page.locator("#card-failed")).not_to_have_class(re.compile(r"\bwarn\b"))
    page.wait_for_timeout(400)
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(IMAGES / "dashboard.png"), full_page=True)
    page.close()


def test_the_picker_in_the_service_corrects_a_micrograph(
    live: tuple[ServiceProcess, Api, Path, Path], browser: Any
) -> None:
    from playwright.sync_api import expect

    _, api, _, output = live
    before = rows(output, "particles")
    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.goto(api.base + "/pick/")
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function("window.flyboxPick.state.image !== null")
    name = page.locator("#current-name").inner_text().strip()
    count = int((before["stem"] == name).sum())
    expect(page.locator("#count-picks")).to_have_text(str(count))

    # Discard one automatic pick by clicking it: saved at once, re-extracted by the service.
    target = page.evaluate("() => window.flyboxPick.state.items[0]")
    box = page.locator("#canvas").bounding_box()
    sx, sy = page.evaluate(
        "([x, y]) => window.flyboxPick.toScreen(x, y)", [target["x"], target["y"]]
    )
    page.mouse.click(box["x"] + sx, box["y"] + sy)
    page.evaluate("() => window.flyboxPick.state.saving")
    expect(page.locator("#count-picks")).to_have_text(str(count - 1))
    expect(page.locator("#count-discarded")).to_have_text("1")
    wait_for(lambda: committed_version(output, name, 2), 60, f"{name} re-extracted")
    for stream in ("particles", "particles_small"):
        after = rows(output, stream)
        assert int((after["stem"] == name).sum()) == count - 1
        assert set(after[after["stem"] == name]["flyboxPickOrigin"]) == {"auto"}

    # Autopick proposes with the service's model: no manual picks needed, no training here.
    expect(page.locator("#summary")).to_contain_text("autopick with the service's model")
    expect(page.locator("#autopick")).to_be_enabled()
    page.locator("#autopick").click()
    expect(page.locator("#message")).to_contain_text("from model v1", timeout=30_000)
    expect(page.locator("#summary")).to_contain_text("autopick used")
    expect(page.locator("#summary")).to_contain_text("model v1")
    page.wait_for_timeout(300)
    page.screenshot(path=str(IMAGES / "live-pick.png"))
    page.close()

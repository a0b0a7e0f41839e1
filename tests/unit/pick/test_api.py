"""Every /api/pick endpoint through httpx's ASGI transport (no socket), with the bad inputs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from flybox.pick.app import create_pick_app
from flybox.pick.features import prepare
from flybox.pick.learner import LabelledMicrograph, PickModel, train
from flybox.pick.model_file import MODEL_FILE_NAME
from flybox.pick.session import PickSession
from flybox.pick.store import SESSION_FILE, PickStore
from flybox.pick.synthetic import SyntheticMicrograph, match_picks
from tests.unit.pick.conftest import PARTICLE_SIZE

API = "/api/pick"


async def _client(store: PickStore, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_pick_app(PickSession(store), token=token)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        yield client


@pytest.fixture
def store(tmp_path: Path, micrograph_files: list[Path]) -> PickStore:
    broken = micrograph_files[0].parent / "broken.mrc"
    broken.write_bytes(b"not an MRC file at all" * 10)
    return PickStore([*micrograph_files, broken], tmp_path / "Picks", particle_size=PARTICLE_SIZE)


@pytest.fixture
async def client(store: PickStore) -> AsyncIterator[httpx.AsyncClient]:
    async for c in _client(store):
        yield c


def _picks(mic: SyntheticMicrograph, count: int | None = None) -> list[dict[str, float]]:
    return [{"x": float(x), "y": float(y)} for x, y in mic.particles[:count]]


async def test_list_shows_counts_states_and_the_unreadable_micrograph(
    client: httpx.AsyncClient,
) -> None:
    listing = (await client.get(f"{API}/micrographs")).json()
    assert [m["name"] for m in listing] == ["mic0", "mic1", "mic2", "broken"]
    assert listing[0] == {
        "name": "mic0",
        "picks": 0,
        "discarded": 0,
        "state": "not_visited",
        "error": None,
        "shape": [768, 768],
    }
    assert "broken.mrc" in listing[3]["error"]


async def test_image_is_a_png_and_an_unreadable_micrograph_says_why(
    client: httpx.AsyncClient,
) -> None:
    response = await client.get(f"{API}/micrographs/mic0/image?lowpass=4&contrast=2.5")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG\r\n\x1a\n")
    bad = await client.get(f"{API}/micrographs/broken/image")
    assert bad.status_code == 422
    assert "broken.mrc" in bad.json()["error"]
    assert (await client.get(f"{API}/micrographs/mic0/image?contrast=abc")).status_code == 400
    assert (await client.get(f"{API}/micrographs/nope/image")).status_code == 404


async def test_put_saves_at_once_and_a_stale_if_match_gets_409(
    client: httpx.AsyncClient, store: PickStore, synthetic_set: list[SyntheticMicrograph]
) -> None:
    first = await client.get(f"{API}/micrographs/mic0/picks")
    etag = first.headers["etag"]
    body = {"picks": _picks(synthetic_set[0], 5), "discarded": [{"x": 10.0, "y": 12.0}]}
    saved = await client.put(f"{API}/micrographs/mic0/picks", json=body, headers={"If-Match": etag})
    assert saved.status_code == 200
    assert saved.json()["state"] == "picked"
    assert saved.headers["etag"] != etag
    assert (store.folder / "mic0_manualpick.star").is_file()
    assert (store.folder / "mic0_discarded.star").is_file()
    stale = await client.put(
        f"{API}/micrographs/mic0/picks", json={"picks": []}, headers={"If-Match": etag}
    )
    assert stale.status_code == 409
    assert "changed" in stale.json()["error"]
    again = (await client.get(f"{API}/micrographs/mic0/picks")).json()
    assert len(again["picks"]) == 5
    assert again["discarded"] == [{"x": 10.0, "y": 12.0, "origin": "manual", "score": None}]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"picks": [{"x": "left", "y": 3}]}, "picks.0.x"),
        ({"picks": [{"x": 1, "y": 2, "origin": "robot"}]}, "picks.0.origin"),
        ({"picks": [{"x": 1, "y": 2, "score": 3}]}, "picks.0.score"),
        ({"picks": [{"x": 5000, "y": 2}]}, "outside the micrograph"),
        ({"pics": []}, "picks"),
    ],
)
async def test_invalid_put_gets_400_with_the_reason_and_changes_nothing(
    client: httpx.AsyncClient, store: PickStore, body: dict[str, object], reason: str
) -> None:
    response = await client.put(f"{API}/micrographs/mic1/picks", json=body)
    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert not (store.folder / "mic1_manualpick.star").exists()
    assert store.get("mic1").state == "not_visited"


async def test_autopick_needs_fifteen_manual_picks_then_proposes_and_trains_once(
    client: httpx.AsyncClient, store: PickStore, synthetic_set: list[SyntheticMicrograph]
) -> None:
    early = await client.post(f"{API}/micrographs/mic1/autopick")
    assert early.status_code == 409
    assert "15 manual picks" in early.json()["error"]
    await client.put(f"{API}/micrographs/mic0/picks", json={"picks": _picks(synthetic_set[0])})
    summary = (await client.get(f"{API}/summary")).json()
    assert summary["enough_labels"] is True
    proposed = await client.post(f"{API}/micrographs/mic1/autopick")
    assert proposed.status_code == 200
    picks = proposed.json()["picks"]
    assert len(picks) > 20
    assert all(p["origin"] == "auto" and 0.2 <= p["score"] <= 1 for p in picks)
    assert proposed.json()["model_version"] == 1
    await client.post(f"{API}/micrographs/mic1/autopick")
    assert store.model_version == 1  # same labels: no retraining
    assert (store.folder / "model.flypick").is_file()
    broken = await client.post(f"{API}/micrographs/broken/autopick")
    assert broken.status_code == 422


async def test_summary_and_session_settings(client: httpx.AsyncClient) -> None:
    summary = (await client.get(f"{API}/summary")).json()
    expected = {"particle_size", "manual", "automatic", "discarded", "autopick_used"}
    assert expected | {"last_micrograph", "model_version", "labels_needed"} <= summary.keys()
    changed = await client.put(
        f"{API}/session", json={"particle_size": 50, "threshold": 0.6, "last_micrograph": "mic2"}
    )
    assert changed.status_code == 200
    assert changed.json()["particle_size"] == 50
    assert changed.json()["last_micrograph"] == "mic2"
    assert (await client.put(f"{API}/session", json={"particle_size": -1})).status_code == 400
    assert (await client.put(f"{API}/session", json={"last_micrograph": "x"})).status_code == 400


async def test_autopick_all_fills_micrographs_not_visited_with_progress(
    client: httpx.AsyncClient, store: PickStore, synthetic_set: list[SyntheticMicrograph]
) -> None:
    await client.put(f"{API}/micrographs/mic0/picks", json={"picks": _picks(synthetic_set[0])})
    started = await client.post(f"{API}/autopick-all?threshold=0.5")
    assert started.status_code == 202
    for _ in range(200):
        job = (await client.get(f"{API}/autopick-all")).json()
        if not job["running"]:
            break
        await asyncio.sleep(0.05)
    assert job == {"running": False, "done": 2, "total": 2, "current": "mic2", "error": None}
    listing = {m["name"]: m for m in (await client.get(f"{API}/micrographs")).json()}
    assert listing["mic1"]["state"] == "proposed"
    assert listing["mic1"]["picks"] > 20
    assert listing["broken"]["state"] == "not_visited"


async def test_token_is_required_when_set(store: PickStore) -> None:
    async for client in _client(store, token="s3cret"):
        assert (await client.get(f"{API}/summary")).status_code == 401
        headers = {"Authorization": "Bearer s3cret"}
        assert (await client.get(f"{API}/summary", headers=headers)).status_code == 200
        assert (await client.get(f"{API}/summary?token=s3cret")).status_code == 200
        assert (await client.get("/")).status_code == 200  # the page holds no data


async def test_page_and_static_files_are_served(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert 'content="/api/pick"' in page.text
    script = await client.get("/static/picker.js")
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]


async def test_a_picks_file_that_does_not_parse_is_reported_and_never_overwritten(
    tmp_path: Path, micrograph_files: list[Path]
) -> None:
    folder = tmp_path / "Picks"
    folder.mkdir()
    garbage = "data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n12 banana\n"
    (folder / "mic0_manualpick.star").write_text(garbage)
    store = PickStore(micrograph_files, folder, particle_size=PARTICLE_SIZE)
    async for client in _client(store):
        record = (await client.get(f"{API}/micrographs/mic0/picks")).json()
        assert "file kept as it is" in record["picks_error"]
        listing = (await client.get(f"{API}/micrographs")).json()
        assert "mic0_manualpick.star" in listing[0]["error"]
        response = await client.put(f"{API}/micrographs/mic0/picks", json={"picks": []})
        assert response.status_code == 409
    assert (folder / "mic0_manualpick.star").read_text() == garbage


async def test_with_a_model_source_autopick_and_correct_and_next_use_that_model_at_once(
    store: PickStore, synthetic_set: list[SyntheticMicrograph], tmp_path: Path
) -> None:
    """The service's picker: no manual picks, no training; proposals from the source's model
    and version, and the summary says so."""
    examples = [
        LabelledMicrograph(f"t{i}", prepare(m.image, PARTICLE_SIZE), m.particles)
        for i, m in enumerate(synthetic_set[2:4])
    ]
    model = train(examples, PARTICLE_SIZE)
    handed: list[int] = []

    def source() -> tuple[PickModel, int]:
        handed.append(7)
        return model, 7

    app = create_pick_app(PickSession(store, model_source=source))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        summary = (await client.get(f"{API}/summary")).json()
        assert summary["manual"] == 0
        assert (summary["model_source"], summary["enough_labels"]) == ("service", True)
        assert summary["labels_needed"] == 0
        answer = await client.post(f"{API}/micrographs/mic0/autopick?min_score=0.5")
        assert answer.status_code == 200
        assert answer.json()["model_version"] == 7
        proposed = np.array([(p["x"], p["y"]) for p in answer.json()["picks"]])
        expected = model.propose(prepare(synthetic_set[0].image, PARTICLE_SIZE), min_score=0.5)
        np.testing.assert_allclose(proposed, expected.xy)
        tp, fp, fn = match_picks(proposed, synthetic_set[0].particles, PARTICLE_SIZE)
        assert 2 * tp / (2 * tp + fp + fn) >= 0.8

        # "Correct and next": save the correction, then propose on the next micrograph.
        picks = await client.get(f"{API}/micrographs/mic0/picks")
        body = {"picks": answer.json()["picks"], "discarded": [], "state": "corrected"}
        saved = await client.put(
            f"{API}/micrographs/mic0/picks", json=body, headers={"If-Match": picks.headers["ETag"]}
        )
        assert saved.status_code == 200
        following = await client.post(f"{API}/micrographs/mic1/autopick?min_score=0.5")
        assert following.status_code == 200
        assert following.json()["model_version"] == 7
        assert len(following.json()["picks"]) > 20
        summary = (await client.get(f"{API}/summary")).json()
        assert (summary["model_version"], summary["autopick_used"]) == (7, True)
        # The particle size is the service model's: another would make its proposals wrong.
        refused = await client.put(f"{API}/session", json={"particle_size": PARTICLE_SIZE * 2})
        assert refused.status_code == 409
        assert "service model" in refused.json()["error"]
        assert (await client.get(f"{API}/summary")).json()["particle_size"] == PARTICLE_SIZE
    # Never trained: no session model file, and the source was asked each time.
    assert not (store.folder / MODEL_FILE_NAME).exists()
    assert len(handed) == 2
    saved_summary = json.loads((store.folder / SESSION_FILE).read_text())
    assert saved_summary["model_version"] == 7

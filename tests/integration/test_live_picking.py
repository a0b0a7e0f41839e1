"""Picking inside the real service (issue 13): autopick, corrections through /api/pick,
exactly once through SIGKILL, and learning from corrections."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flybox.io.mrc import read_micrograph, write_micrograph
from flybox.io.star import read_relion_star
from flybox.pick.features import prepare
from flybox.pick.learner import LabelledMicrograph, train
from flybox.pick.model_file import load_model, save_model
from flybox.pick.synthetic import SyntheticMicrograph, match_picks, synthetic_micrograph
from tests.helpers.service import ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.slow

SIZE = 48
STREAMS = {"particles": "particles.star", "particles_small": "particles_small.star"}


def synthetic(seed: int) -> SyntheticMicrograph:
    return synthetic_micrograph(
        768, SIZE, particles=40, rings=8, disks=8, aggregates=4, ice=14, amplitude=0.5, seed=seed
    )


def labelled_model(path: Path) -> None:
    """A model trained on 2 labelled synthetic micrographs with decoys."""
    examples = [
        LabelledMicrograph(f"t{seed}", prepare(m.image, SIZE), m.particles)
        for seed, m in ((seed, synthetic(seed)) for seed in (100, 101))
    ]
    save_model(path, train(examples, SIZE))


def live_config(folder: Path, inputs: Path, output: Path, model: Path, *, learn: bool) -> Path:
    text = f"""
[session]
name = "live"
output = "{output}"

[watch]
micrographs = ["{inputs}/*.mrc"]
settle_seconds = 0.3
rescan_seconds = 2.0

[picking]
model = "{model}"
learn = {str(learn).lower()}
threshold = 0.5

[[chain]]
step = "extract"
box = 64
border = "fill"

[[chain]]
step = "fourier_crop"
outputs = {{ particles = 64, particles_small = 32 }}

[[chain]]
step = "normalize"
method = "ramp"

[executor]
workers = 2
drain_seconds = 20

[http]
listen = "127.0.0.1:{free_port()}"
"""
    path = folder / "flybox.toml"
    path.write_text(text)
    return path


class Api:
    def __init__(self, config: Path) -> None:
        listen = config.read_text().split('listen = "')[1].split('"')[0]
        self.base = f"http://{listen}"

    def call(
        self,
        path: str,
        method: str = "GET",
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers=headers or {}
        )
        if data is not None:
            request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), json.loads(response.read())

    def done(self) -> int:
        try:
            return int(self.call("/api/status")[2]["counts"]["done"])
        except OSError:
            return -1

    def correct(self, name: str, picks: np.ndarray) -> None:
        _, headers, _ = self.call(f"/api/pick/micrographs/{name}/picks")
        body = {
            "picks": [{"x": float(x), "y": float(y), "origin": "manual"} for x, y in picks],
            "discarded": [],
            "state": "corrected",
        }
        status, _, _ = self.call(
            f"/api/pick/micrographs/{name}/picks", "PUT", body, {"If-Match": headers["ETag"]}
        )
        assert status == 200


def autopick(api: Api, name: str) -> tuple[np.ndarray, int]:
    """The picker's Autopick on ``name`` (every proposal scoring 0.05 or more)."""
    status, _, body = api.call(f"/api/pick/micrographs/{name}/autopick?min_score=0.05", "POST", {})
    assert status == 200
    xy = np.array([(p["x"], p["y"]) for p in body["picks"]], dtype=np.float64).reshape(-1, 2)
    return xy, int(body["model_version"])


def rows(output: Path, stream: str) -> pd.DataFrame:
    table = read_relion_star(output / STREAMS[stream], "particles").rows
    return table.assign(stem=[Path(str(n)).stem for n in table["rlnMicrographName"]])


def units(output: Path) -> dict[str, dict[str, Any]]:
    """The current unit of each stem (state, version, inputs)."""
    with sqlite3.connect(output / ".flybox" / "journal.sqlite") as db:
        found = db.execute(
            "SELECT u.stem, u.version, u.state, u.inputs FROM current c JOIN units u "
            "ON u.id = c.unit"
        ).fetchall()
        latest = db.execute("SELECT stem, MAX(version) FROM units GROUP BY stem").fetchall()
    newest = dict(latest)
    return {
        stem: {"version": v, "state": s, "inputs": json.loads(i), "newest": newest[stem]}
        for stem, v, s, i in found
    }


def committed_version(output: Path, stem: str, version: int) -> bool:
    try:
        unit = units(output).get(stem)
    except sqlite3.Error:
        return False
    return unit is not None and unit["version"] == version and unit["state"] == "done"


def coordinates(table: pd.DataFrame, stem: str) -> set[tuple[float, float]]:
    own = table[table["stem"] == stem]
    return {
        (round(float(x), 1), round(float(y), 1))
        for x, y in zip(own["rlnCoordinateX"], own["rlnCoordinateY"], strict=True)
    }


def test_the_service_picks_learns_and_re_extracts_corrections_exactly_once(
    tmp_path: Path,
) -> None:
    model = tmp_path / "model.flypick"
    labelled_model(model)
    inputs, output = tmp_path / "Micrographs", tmp_path / "out"
    inputs.mkdir()
    truth: dict[str, np.ndarray] = {}
    for seed in range(10):
        mic = synthetic(seed)
        write_micrograph(inputs / f"mic{seed:02d}.mrc", mic.image, 1.0)
        truth[f"mic{seed:02d}"] = mic.particles
    config = live_config(tmp_path, inputs, output, model, learn=True)
    api = Api(config)
    service = ServiceProcess(config, tmp_path / "service.log")
    service.start()
    try:
        wait_for(lambda: api.done() >= 10, 180, "10 micrographs committed")

        # Autopicked and extracted: the particles match the true ones.
        particles = rows(output, "particles")
        tp = fp = fn = 0
        for stem, true in truth.items():
            own = particles[particles["stem"] == stem]
            xy = own[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy()
            a, b, c = match_picks(xy, true, SIZE)
            tp, fp, fn = tp + a, fp + b, fn + c
            assert (output / "Picks" / f"{stem}_autopick.star").is_file()
        f1 = 2 * tp / (2 * tp + fp + fn)
        assert f1 >= 0.85, f"F1 {f1:.3f} (tp {tp}, fp {fp}, fn {fn})"
        assert set(particles["flyboxPickOrigin"]) == {"auto"}
        assert {u["inputs"]["autopick_model"] for u in units(output).values()} == {1}
        metrics = urllib.request.urlopen(api.base + "/metrics", timeout=10).read().decode()
        assert "flybox_pick_model_version 1.0" in metrics

        # The picker's Autopick uses the service's model at once: no manual picks, no
        # training in the picker; the summary shows the service's version and "autopick used".
        summary = api.call("/api/pick/summary")[2]
        assert (summary["manual"], summary["model_source"], summary["enough_labels"]) == (
            0,
            "service",
            True,
        )
        proposed, version = autopick(api, "mic07")
        assert version == 1
        shown = api.call("/api/pick/micrographs/mic07/picks")[2]
        known = [(p["x"], p["y"]) for p in (*shown["picks"], *shown["discarded"])]
        image, _ = read_micrograph(str(inputs / "mic07.mrc"))
        expected = load_model(model).propose(
            prepare(image, SIZE), min_score=0.05, exclude=np.array(known).reshape(-1, 2)
        )
        assert len(expected) > 0
        np.testing.assert_allclose(proposed, expected.xy)
        summary = api.call("/api/pick/summary")[2]
        assert (summary["model_version"], summary["autopick_used"]) == (1, True)
        assert not (output / "Picks" / "model.flypick").exists()

        # A correction through the API: its rows in every stream become exactly the picks.
        before = {stream: rows(output, stream) for stream in STREAMS}
        corrected = truth["mic03"][:25]
        api.correct("mic03", corrected)
        wait_for(lambda: committed_version(output, "mic03", 2), 60, "mic03 re-extracted")
        expected = {(round(float(x), 1), round(float(y), 1)) for x, y in corrected}
        for stream in STREAMS:
            after = rows(output, stream)
            assert coordinates(after, "mic03") == expected
            assert len(after[after["stem"] == "mic03"]) == len(corrected)
            assert set(after[after["stem"] == "mic03"]["flyboxPickOrigin"]) == {"manual"}
            others = after[after["stem"] != "mic03"].reset_index(drop=True)
            untouched = before[stream][before[stream]["stem"] != "mic03"].reset_index(drop=True)
            pd.testing.assert_frame_equal(others, untouched)
        assert (output / "Picks" / "mic03_manualpick.star").is_file()

        # learn = true: a new model version from the correction, announced.
        wait_for(
            lambda: api.call("/api/pick/model")[2]["current"] >= 2, 60, "a learned model version"
        )
        learned = api.call("/api/pick/model")[2]
        assert Path(learned["versions"][-1]["path"]).is_file()
        metrics = urllib.request.urlopen(api.base + "/metrics", timeout=10).read().decode()
        assert f"flybox_pick_model_version {float(learned['current'])}" in metrics
        # ... and the picker's Autopick proposes with the learned version from then on.
        assert autopick(api, "mic07")[1] == learned["current"]
        assert api.call("/api/pick/summary")[2]["model_version"] == learned["current"]

        # SIGKILL while the corrected micrograph is re-extracted; restart: exactly once.
        second = truth["mic05"][5:30]
        api.correct("mic05", second)
        service.kill()
        service.start()
        wait_for(lambda: committed_version(output, "mic05", 2), 90, "mic05 re-extracted")
        expected = {(round(float(x), 1), round(float(y), 1)) for x, y in second}
        for stream in STREAMS:
            after = rows(output, stream)
            assert len(after[after["stem"] == "mic05"]) == len(second)
            assert coordinates(after, "mic05") == expected
            assert coordinates(after, "mic03") == {
                (round(float(x), 1), round(float(y), 1)) for x, y in corrected
            }
            assert after.groupby("stem").size().to_dict().keys() == truth.keys()
            assert not after.duplicated(["stem", "rlnCoordinateX", "rlnCoordinateY"]).any()

        # The learned model is used for micrographs processed from then on.
        wait_for(lambda: api.done() >= 10, 60, "the restarted service to report")
        current = api.call("/api/pick/model")[2]["current"]
        assert current >= 2
        mic = synthetic(10)
        write_micrograph(inputs / "mic10.mrc", mic.image, 1.0)
        wait_for(lambda: committed_version(output, "mic10", 1), 60, "mic10 committed")
        state = units(output)
        assert state["mic10"]["inputs"]["autopick_model"] == current
        assert state["mic00"]["inputs"]["autopick_model"] == 1  # a restart never repicks
        assert all(u["newest"] == u["version"] for u in state.values())

        # "Re-pick with the current model": new versions of the uncorrected micrographs.
        status, _, body = api.call("/api/pick/repick", "POST", {})
        assert status == 202
        assert "mic03" not in body["micrographs"]
        assert "mic05" not in body["micrographs"]
        assert "mic00" in body["micrographs"]
        wait_for(lambda: committed_version(output, "mic00", 2), 90, "mic00 re-picked")
        assert units(output)["mic00"]["inputs"]["autopick_model"] == current
        assert service.terminate() == 0
    finally:
        if service.alive():
            service.kill()
    service.assert_no_leftovers()
    log = service.output()
    assert "Traceback" not in log, log[-3000:]

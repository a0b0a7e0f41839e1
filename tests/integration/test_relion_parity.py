"""RELION parity: ``flybox extract`` against ``relion_preprocess`` (RELION 3.1.3, Debian).

Synthetic micrographs made by the project's simulator (non-square, picks with sub-pixel
fractions, some boxes crossing the edges) are extracted by both programs; every particle of
the full-size and the small (Fourier-cropped) set must correlate ≥ 0.9999 with RELION's, with
and without the box-level phase flip. The RELION reference outputs made from the real
micrograph in ../shared/data/real/peer-outputs are checked the same way.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import numpy.typing as npt
import pytest
import starfile

from flybox.cli import main
from flybox.sim.microscope import write_dataset
from tests.conftest import require_binary

pytestmark = pytest.mark.relion

BOX = 96
SMALL = 48
BG_RADIUS = 36


def correlations(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """Pearson correlation of each image pair."""
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    y -= y.mean(axis=1, keepdims=True)
    return (x * y).sum(axis=1) / np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))


def relion_extract(project: Path, part_dir: str, *extra: str, bg_radius: int = BG_RADIUS) -> Path:
    """Run relion_preprocess in ``project``; returns the particles STAR path.

    RELION's command line takes the background radius in pixels of the *output* images (its
    GUI scales it, int(R·M/N)); flybox takes it for the extraction box and scales it itself.
    """
    binary = require_binary("relion_preprocess")
    star = f"{part_dir}.star"
    subprocess.run(
        [
            binary,
            "--i",
            "micrographs_ctf.star",
            "--coord_dir",
            "AutoPick/",
            "--coord_suffix",
            "_autopick.star",
            "--part_star",
            star,
            "--part_dir",
            f"{part_dir}/",
            "--extract",
            "--extract_size",
            str(BOX),
            "--norm",
            "--bg_radius",
            str(bg_radius),
            "--white_dust",
            "-1",
            "--black_dust",
            "-1",
            "--invert_contrast",
            *extra,
        ],
        cwd=project,
        check=True,
        capture_output=True,
    )
    return project / star


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two simulated micrographs (560 x 640), 40 picks each, a CTF micrographs STAR."""
    require_binary("relion_preprocess")
    folder = tmp_path_factory.mktemp("relion_project")
    write_dataset(folder, 2, shape=(560, 640), n_particles=40, pixel_size_a=1.5, seed=7)
    return folder


def run_flybox(project: Path, out: str, *extra: str, workers: int = 1) -> Path:
    cwd = os.getcwd()
    os.chdir(project)
    try:
        code = main(
            [
                "extract",
                "--micrographs",
                "micrographs_ctf.star",
                "--coords",
                "AutoPick/",
                "--coord-suffix",
                "_autopick.star",
                "-o",
                out,
                "--box",
                str(BOX),
                "--fcrop-small",
                str(SMALL),
                "--norm",
                "ramp",
                "--bg-radius",
                str(BG_RADIUS),
                "--invert",
                "--workers",
                str(workers),
                "--no-progress",
                *extra,
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    return project / out


def compare_stacks(ours: Path, theirs: Path, box: int) -> npt.NDArray[np.float64]:
    with mrcfile.open(ours) as a, mrcfile.open(theirs) as b:
        assert a.data.shape == b.data.shape
        assert a.data.shape[1:] == (box, box)
        return correlations(a.data, b.data)


@pytest.mark.parametrize("phase_flip", [False, True], ids=["plain", "phase_flip"])
def test_full_and_small_sets_match_relion_per_particle(project: Path, phase_flip: bool) -> None:
    flip = ["--phase_flip"] if phase_flip else []
    tag = "flip" if phase_flip else "plain"
    relion_extract(project, f"Full_{tag}", *flip)
    relion_extract(
        project, f"Small_{tag}", "--scale", str(SMALL), *flip, bg_radius=BG_RADIUS * SMALL // BOX
    )
    out = run_flybox(project, f"flybox_{tag}", *(["--phase-flip"] if phase_flip else []))

    ours = starfile.read(out / "particles.star")
    border = ours["particles"]["flyboxBorderFraction"].to_numpy()
    assert (border > 0).sum() >= 4, "the data must include boxes crossing the micrograph edge"

    for mic in ("mic000", "mic001"):
        full = compare_stacks(
            out / "Particles" / f"{mic}.mrcs", project / f"Full_{tag}/Micrographs/{mic}.mrcs", BOX
        )
        small = compare_stacks(
            out / "ParticlesSmall" / f"{mic}.mrcs",
            project / f"Small_{tag}/Micrographs/{mic}.mrcs",
            SMALL,
        )
        assert full.min() >= 0.9999, f"{mic} full: worst correlation {full.min():.6f}"
        assert small.min() >= 0.9999, f"{mic} small: worst correlation {small.min():.6f}"


def test_star_files_carry_relion_geometry_and_optics(project: Path) -> None:
    relion = starfile.read(relion_extract(project, "Full_star"))
    out = run_flybox(project, "flybox_star", workers=2)
    ours = starfile.read(out / "particles.star")
    small = starfile.read(out / "particles_small.star")

    np.testing.assert_allclose(
        ours["particles"]["rlnCoordinateX"], relion["particles"]["rlnCoordinateX"], atol=1e-4
    )
    np.testing.assert_allclose(
        ours["particles"]["rlnCoordinateY"], relion["particles"]["rlnCoordinateY"], atol=1e-4
    )
    assert list(ours["particles"]["rlnImageName"][:2]) == [
        "000001@flybox_star/Particles/mic000.mrcs",  # relative to the project folder
        "000002@flybox_star/Particles/mic000.mrcs",
    ]
    np.testing.assert_allclose(ours["particles"]["rlnDefocusU"], relion["particles"]["rlnDefocusU"])
    optics = ours["optics"].iloc[0]
    assert optics["rlnImageSize"] == BOX
    assert optics["rlnImagePixelSize"] == pytest.approx(1.5)
    assert optics["rlnImageDimensionality"] == 2
    assert optics["rlnCtfDataAreCtfPremultiplied"] == 0
    assert optics["rlnVoltage"] == pytest.approx(300.0)
    small_optics = small["optics"].iloc[0]
    assert small_optics["rlnImageSize"] == SMALL
    assert small_optics["rlnImagePixelSize"] == pytest.approx(1.5 * BOX / SMALL)
    assert (
        small["particles"]["rlnImageName"].iloc[0]
        == "000001@flybox_star/ParticlesSmall/mic000.mrcs"
    )


REAL_MIC = "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/mics/Ucsf_stack_1142_DW.mrc"
REAL_PICKS = (
    "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/inCoords/relion/"
    "Ucsf_stack_1142_DW_autopick.star"
)
PEER = "peer-outputs/relion-3.1.3_extract"


@pytest.mark.parametrize(
    ("reference", "options", "exact"),
    [
        ("ExtractRaw", ["--norm", "none"], True),
        ("Extract", ["--norm", "ramp", "--bg-radius", "25", "--invert"], False),
        ("ExtractScale", ["--norm", "none", "--fcrop", "32"], False),
    ],
)
def test_real_micrograph_matches_relion_reference_outputs(
    real_data: Path, tmp_path: Path, reference: str, options: list[str], exact: bool
) -> None:
    code = main(
        [
            "extract",
            "--micrographs",
            str(real_data / REAL_MIC),
            "--coords",
            str(real_data / REAL_PICKS),
            "-o",
            str(tmp_path / "out"),
            "--box",
            "64",
            "--workers",
            "1",
            "--no-progress",
            *options,
        ]
    )
    assert code == 0
    ours = mrcfile.read(tmp_path / "out" / "Particles" / "Ucsf_stack_1142_DW.mrcs")
    theirs = mrcfile.read(real_data / PEER / reference / "Micrographs" / "Ucsf_stack_1142_DW.mrcs")
    assert ours.shape == theirs.shape == (45, *theirs.shape[1:])
    if exact:
        np.testing.assert_array_equal(ours, theirs)
    else:
        assert correlations(ours, theirs).min() >= 0.9999
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4 * np.abs(theirs).max())

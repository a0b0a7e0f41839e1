"""CTF grid and phase flipping (ALGORITHMS.md §7)."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from flybox.errors import ProcessingError
from flybox.processors.base import Micrograph, ParticleStack
from flybox.processors.ctf import (
    MicrographPhaseFlipSettings,
    MicrographPhaseFlipStep,
    PhaseFlipSettings,
    PhaseFlipStep,
    ctf_grid,
    flip_signs,
    relion_flip_factors,
)
from flybox.processors.edges import apply_edge_fill
from flybox.types import CtfParams
from tests.conftest import require_binary

CTF = CtfParams(
    defocus_u_a=21000.0,
    defocus_v_a=17000.0,
    defocus_angle_deg=35.0,
    voltage_kv=300.0,
    cs_mm=2.7,
    amplitude_contrast=0.1,
    phase_shift_deg=20.0,
    bfactor_a2=40.0,
)


def reference_ctf(
    ky: np.ndarray, kx: np.ndarray, ctf: CtfParams, psi_rad: float | np.ndarray
) -> np.ndarray:
    """The textbook formula of §7.1 with Δf(θ) = U·cos²(θ−φ) + V·sin²(θ−φ)."""
    wavelength = ctf.wavelength_a()
    assert ctf.cs_mm is not None
    assert ctf.amplitude_contrast is not None
    q0 = ctf.amplitude_contrast
    u2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx) - math.radians(ctf.defocus_angle_deg)
    defocus = ctf.defocus_u_a * np.cos(theta) ** 2 + ctf.defocus_v_a * np.sin(theta) ** 2
    chi = (
        -math.pi * wavelength * defocus * u2 + math.pi / 2 * ctf.cs_mm * 1e7 * wavelength**3 * u2**2
    )
    alpha = math.atan(q0 / math.sqrt(1 - q0 * q0))
    return -np.sin(chi - alpha - psi_rad)


def relion_get_fftw_image(box: int, pixel: float, ctf: CtfParams) -> np.ndarray:
    """Scalar transcription of RELION's getFftwImage loop with the older getDeltaF form.

    Row index i maps to ip = i if i < XSIZE (= box//2 + 1) else i − YSIZE, as
    FOR_ALL_ELEMENTS_IN_FFTW_TRANSFORM2D does; Δf = avg + dev·cos(2(atan2(y, x) − az)).
    """
    assert ctf.cs_mm is not None
    assert ctf.amplitude_contrast is not None
    wavelength = ctf.wavelength_a()
    k1 = math.pi * wavelength
    k2 = math.pi / 2 * ctf.cs_mm * 1e7 * wavelength**3
    q0 = ctf.amplitude_contrast
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0))
    k5 = math.radians(ctf.phase_shift_deg)
    average = -(ctf.defocus_u_a + ctf.defocus_v_a) / 2
    deviation = -(ctf.defocus_u_a - ctf.defocus_v_a) / 2
    azimuth = math.radians(ctf.defocus_angle_deg)
    xsize = box // 2 + 1
    out = np.empty((box, xsize))
    for i in range(box):
        ip = i if i < xsize else i - box
        for j in range(xsize):
            x, y = j / (box * pixel), ip / (box * pixel)
            u2 = x * x + y * y
            delta = (
                0.0 if u2 == 0 else average + deviation * math.cos(2 * (math.atan2(y, x) - azimuth))
            )
            out[i, j] = -math.sin(k1 * delta * u2 + k2 * u2 * u2 - k5 - k3)
    return out


def frequencies(ny: int, nx: int, pixel: float) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(ny)
    rows = np.where(rows <= ny // 2, rows, rows - ny)
    return (rows / (ny * pixel))[:, None], (np.arange(nx // 2 + 1) / (nx * pixel))[None, :]


@pytest.mark.parametrize("shape", [(64, 64), (65, 65), (48, 80), (63, 50)])
def test_grid_matches_the_textbook_formula(shape: tuple[int, int]) -> None:
    grid = ctf_grid(shape, 1.3, CTF)
    assert grid.shape == (shape[0], shape[1] // 2 + 1)
    assert grid.dtype == np.float64
    ky, kx = frequencies(*shape, 1.3)
    np.testing.assert_allclose(grid, reference_ctf(ky, kx, CTF, math.radians(20.0)), atol=1e-9)


@pytest.mark.parametrize("box", [64, 65, 100])
def test_grid_matches_relions_getfftwimage(box: int) -> None:
    np.testing.assert_allclose(
        ctf_grid((box, box), 1.1, CTF), relion_get_fftw_image(box, 1.1, CTF), atol=1e-9
    )


def test_zero_frequency_value_is_minus_sine_of_the_constant_phase() -> None:
    alpha = math.atan(0.1 / math.sqrt(1 - 0.01))
    psi = math.radians(20.0)
    assert ctf_grid((32, 32), 1.0, CTF)[0, 0] == pytest.approx(-math.sin(-alpha - psi), abs=1e-15)
    no_shift = ctf_grid((32, 32), 1.0, CTF, phase_shift=False)
    assert no_shift[0, 0] == pytest.approx(-math.sin(-alpha), abs=1e-15)


def test_astigmatism_axis_u_lies_along_the_defocus_angle() -> None:
    pure = CtfParams(20000.0, 10000.0, 0.0, voltage_kv=200.0, cs_mm=0.0, amplitude_contrast=0.0)
    wavelength = pure.wavelength_a()
    grid = ctf_grid((128, 128), 2.0, pure)
    k = np.arange(1, 30) / (128 * 2.0)
    # φ = 0: along +x (row 0) the defocus is U, along y (column 0) it is V.
    np.testing.assert_allclose(
        grid[0, 1:30], np.sin(math.pi * wavelength * 20000.0 * k**2), atol=1e-12
    )
    np.testing.assert_allclose(
        grid[1:30, 0], np.sin(math.pi * wavelength * 10000.0 * k**2), atol=1e-12
    )
    rotated = ctf_grid((128, 128), 2.0, CtfParams(20000.0, 10000.0, 90.0, 200.0, 0.0, 0.0))
    np.testing.assert_allclose(rotated[0, 1:30], grid[1:30, 0], atol=1e-12)
    np.testing.assert_allclose(rotated[1:30, 0], grid[0, 1:30], atol=1e-12)


def test_nyquist_row_is_the_positive_frequency() -> None:
    # With φ = 45° the defocus depends on the sign of kx·ky, so rows +N/2 and −N/2 differ.
    ctf = CtfParams(25000.0, 12000.0, 45.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.07)
    box, pixel = 64, 1.5
    grid = ctf_grid((box, box), pixel, ctf)
    kx = np.arange(box // 2 + 1) / (box * pixel)
    plus = reference_ctf(np.full_like(kx, 0.5 / pixel), kx, ctf, 0.0)
    minus = reference_ctf(np.full_like(kx, -0.5 / pixel), kx, ctf, 0.0)
    differs = flip_signs(plus) != flip_signs(minus)
    assert differs.sum() >= 3
    np.testing.assert_array_equal(flip_signs(grid[box // 2]), flip_signs(plus))
    np.testing.assert_allclose(grid[box // 2], plus, atol=1e-9)


def test_phase_plate_radius_switches_the_shift_on_gradually() -> None:
    shifted = CtfParams(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.07, phase_shift_deg=90.0)
    unshifted = CtfParams(15000.0, 15000.0, 0.0, 300.0, 2.7, 0.07)
    plain = ctf_grid((64, 64), 1.0, unshifted)
    # Xmipp without a phase-plate radius ignores the shift.
    np.testing.assert_array_equal(ctf_grid((64, 64), 1.0, shifted, phase_shift=False), plain)
    radius = 0.05  # 1/Å
    vpp = ctf_grid((64, 64), 1.0, shifted, phase_shift=False, vpp_radius=radius)
    ky, kx = frequencies(64, 64, 1.0)
    psi = math.radians(90.0) * (1 - np.exp(-(kx**2 + ky**2) / (2 * radius**2)))
    np.testing.assert_allclose(vpp, reference_ctf(ky, kx, unshifted, psi), atol=1e-9)
    assert vpp[0, 0] == plain[0, 0]


def test_envelope_multiplies_by_the_bfactor_decay() -> None:
    ky, kx = frequencies(40, 40, 1.0)
    plain = ctf_grid((40, 40), 1.0, CTF)
    damped = ctf_grid((40, 40), 1.0, CTF, envelope=True)
    np.testing.assert_allclose(damped, plain * np.exp(-40.0 / 4 * (kx**2 + ky**2)), atol=1e-15)


def test_incomplete_or_invalid_ctf_is_refused() -> None:
    with pytest.raises(ValueError, match="voltage"):
        ctf_grid((16, 16), 1.0, CtfParams(10000.0, 10000.0, 0.0))
    with pytest.raises(ValueError, match="amplitude"):
        ctf_grid((16, 16), 1.0, CtfParams(10000.0, 10000.0, 0.0, 300.0, 2.7, 1.5))


def test_flip_signs_leave_zero_unflipped() -> None:
    values = np.array([-1.0, -1e-300, -0.0, 0.0, 1e-300, 2.0])
    signs = flip_signs(values)
    assert signs.dtype == np.float32
    np.testing.assert_array_equal(signs, [-1, -1, 1, 1, 1, 1])


def test_relion_flip_factors_carry_the_scale_and_clamp_tiny_values() -> None:
    grid = np.array([-0.5, 0.0, 0.5])
    np.testing.assert_array_equal(relion_flip_factors(grid, 2.0), [-2.0, 2.0, 2.0])
    np.testing.assert_array_equal(relion_flip_factors(grid, 0.0), np.float32([1e-8, 1e-8, 1e-8]))


# --- Box-level flip --------------------------------------------------------------------


def make_stack(images: np.ndarray, ctf: CtfParams | None = CTF, **kwargs: object) -> ParticleStack:
    table = pd.DataFrame(
        {
            "rlnMicrographName": ["mic_001.mrc"] * len(images),
            "rlnCoordinateX": np.arange(len(images)),
        }
    )
    return ParticleStack(
        table=table,
        pixel_size_a=1.2,
        extraction_box=images.shape[-1],
        box=images.shape[-1],
        images=images.copy(),
        ctf=ctf,
        **kwargs,  # type: ignore[arg-type]
    )


def manual_flip(images: np.ndarray, ctf: CtfParams, pixel: float) -> np.ndarray:
    box = images.shape[-1]
    grid = ctf_grid((box, box), pixel, ctf, envelope=True)
    spectrum = np.fft.rfft2(images.astype(np.float64)) * (flip_signs(grid) * ctf.scale)
    return np.fft.irfft2(spectrum, s=(box, box))


@pytest.fixture
def particles() -> np.ndarray:
    return np.random.default_rng(2).normal(size=(3, 64, 64)).astype(np.float32)


def test_box_flip_equals_a_manual_numpy_flip(particles: np.ndarray) -> None:
    scaled = CtfParams(21000.0, 17000.0, 35.0, 300.0, 2.7, 0.1, 20.0, 40.0, scale=0.5)
    stack = PhaseFlipStep(PhaseFlipSettings()).apply(make_stack(particles, scaled))
    np.testing.assert_allclose(stack.real(), manual_flip(particles, scaled, 1.2), atol=2e-5)


def test_box_flip_twice_is_the_identity(particles: np.ndarray) -> None:
    step = PhaseFlipStep(PhaseFlipSettings())
    stack = make_stack(particles)
    step.apply(step.apply(stack))
    np.testing.assert_allclose(stack.real(), particles, atol=2e-5)


def test_box_flip_happens_before_a_pending_border_fill(particles: np.ndarray) -> None:
    padded = particles.copy()
    padded[0, :, :10] = 0.25  # outside the micrograph: mean-padded, as RELION does
    padded[2, 50:, :] = 0.25
    windows = np.array([[0, 64, 10, 64], [0, 64, 0, 64], [0, 50, 0, 64]], dtype=np.int64)
    stack = make_stack(padded, pending_fill=windows.copy())
    PhaseFlipStep(PhaseFlipSettings()).apply(stack)
    expected = apply_edge_fill(manual_flip(padded, CTF, 1.2).astype(np.float32), windows)
    result = stack.real()
    np.testing.assert_allclose(result, expected, atol=2e-5)
    # Filling first and flipping afterwards would give something else.
    wrong = manual_flip(apply_edge_fill(padded, windows), CTF, 1.2)
    assert np.abs(result[0] - wrong[0]).max() > 1e-2


def test_box_flip_without_phase_shift_setting(particles: np.ndarray) -> None:
    stack = PhaseFlipStep(PhaseFlipSettings(phase_shift=False)).apply(make_stack(particles))
    unshifted = CtfParams(21000.0, 17000.0, 35.0, 300.0, 2.7, 0.1, 0.0, 40.0)
    np.testing.assert_allclose(stack.real(), manual_flip(particles, unshifted, 1.2), atol=2e-5)


@pytest.mark.parametrize("ctf", [None, CtfParams(21000.0, 17000.0, 35.0, voltage_kv=300.0)])
def test_box_flip_without_a_complete_ctf_names_the_micrograph(
    particles: np.ndarray, ctf: CtfParams | None
) -> None:
    with pytest.raises(ProcessingError) as info:
        PhaseFlipStep(PhaseFlipSettings()).apply(make_stack(particles, ctf))
    assert info.value.path == "mic_001.mrc"
    assert "voltage, Cs and amplitude contrast" in str(info.value)


def test_flip_steps_declare_that_they_need_a_ctf() -> None:
    assert PhaseFlipStep.requires_ctf
    assert MicrographPhaseFlipStep.requires_ctf
    assert PhaseFlipStep.kind == "particles"
    assert MicrographPhaseFlipStep.kind == "micrograph"


# --- Micrograph-level flip -------------------------------------------------------------


def test_micrograph_flip_on_a_non_square_image() -> None:
    image = np.random.default_rng(4).normal(size=(90, 150)).astype(np.float32)
    micrograph = Micrograph(image, 1.7, "mic.mrc", pd.DataFrame(), ctf=CTF)
    result = MicrographPhaseFlipStep(MicrographPhaseFlipSettings()).apply(micrograph)
    signs = flip_signs(ctf_grid((90, 150), 1.7, CTF, phase_shift=False))
    expected = np.fft.irfft2(np.fft.rfft2(image.astype(np.float64)) * signs, s=(90, 150))
    assert result.image.dtype == np.float32
    assert result.image.shape == (90, 150)
    np.testing.assert_allclose(result.image, expected, atol=2e-5)
    assert micrograph.image is image  # the input is left alone


def test_micrograph_flip_ignores_the_phase_shift_unless_asked() -> None:
    image = np.random.default_rng(6).normal(size=(64, 96)).astype(np.float32)
    shifted = CtfParams(15000.0, 14000.0, 10.0, 300.0, 2.7, 0.07, phase_shift_deg=90.0)
    unshifted = CtfParams(15000.0, 14000.0, 10.0, 300.0, 2.7, 0.07)

    def flip(ctf: CtfParams, settings: dict[str, object]) -> np.ndarray:
        step = MicrographPhaseFlipStep(MicrographPhaseFlipSettings.model_validate(settings))
        return step.apply(Micrograph(image, 1.0, "m", pd.DataFrame(), ctf=ctf)).image

    np.testing.assert_array_equal(flip(shifted, {}), flip(unshifted, {}))
    assert not np.allclose(flip(shifted, {"phase_shift": True}), flip(unshifted, {}))
    assert not np.allclose(flip(shifted, {"vpp_radius": 0.02}), flip(unshifted, {}))


def test_micrograph_flip_without_ctf_names_the_micrograph() -> None:
    micrograph = Micrograph(np.zeros((8, 8), np.float32), 1.0, "mic_7.mrc", pd.DataFrame())
    with pytest.raises(ProcessingError) as info:
        MicrographPhaseFlipStep(MicrographPhaseFlipSettings()).apply(micrograph)
    assert info.value.path == "mic_7.mrc"


# --- RELION parity (needs relion_preprocess) ---------------------------------------------

OPTICS_STAR = """
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnMicrographPixelSize #7
opticsGroup1 1 1.2 300.0 2.7 0.1 1.2


# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnPhaseShift #6
_rlnCtfBfactor #7
_rlnCtfScalefactor #8
mic.mrc 1 21000.0 17000.0 35.0 20.0 0.0 1.0
"""


@pytest.mark.relion
def test_box_flip_matches_relion_preprocess_including_border_boxes(tmp_path: Path) -> None:
    binary = require_binary("relion_preprocess")
    rng = np.random.default_rng(0)
    mic = rng.normal(5.0, 2.0, (300, 340)).astype(np.float32)
    with mrcfile.new(tmp_path / "mic.mrc") as handle:
        handle.set_data(mic)
        handle.voxel_size = 1.2
    (tmp_path / "mics.star").write_text(OPTICS_STAR)
    coords = [(170.7, 150.2), (100.0, 80.9), (20.5, 40.3), (330.0, 290.0)]
    rows = "\n".join(f"{x} {y}" for x, y in coords)
    (tmp_path / "mic_pick.star").write_text(
        f"\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{rows}\n"
    )
    subprocess.run(
        [binary, "--i", "mics.star", "--coord_dir", "./", "--coord_suffix", "_pick.star",
         "--part_star", "parts.star", "--part_dir", "Particles/", "--extract",
         "--extract_size", "64", "--phase_flip"],
        cwd=tmp_path, check=True, capture_output=True,
    )  # fmt: skip
    relion = mrcfile.read(tmp_path / "Particles" / "mic.mrcs")

    # RELION's order: window with the micrograph mean outside, flip, then edge fill.
    box, (ny, nx) = 64, mic.shape
    boxes, windows = [], []
    for x, y in coords:
        y0, x0 = int(y) - box // 2, int(x) - box // 2
        r0, r1, c0, c1 = max(0, -y0), min(box, ny - y0), max(0, -x0), min(box, nx - x0)
        padded = np.full((box, box), mic.astype(np.float64).mean(), dtype=np.float32)
        padded[r0:r1, c0:c1] = mic[y0 + r0 : y0 + r1, x0 + c0 : x0 + c1]
        boxes.append(padded)
        windows.append([r0, r1, c0, c1])
    ctf = CtfParams(21000.0, 17000.0, 35.0, 300.0, 2.7, 0.1, phase_shift_deg=20.0)
    stack = make_stack(np.stack(boxes), ctf, pending_fill=np.array(windows, dtype=np.int64))
    stack.pixel_size_a = 1.2
    PhaseFlipStep(PhaseFlipSettings()).apply(stack)
    np.testing.assert_allclose(stack.real(), relion, atol=2e-5)

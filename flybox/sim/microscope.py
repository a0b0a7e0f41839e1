"""A synthetic microscope: micrographs with particles, CTF, a background ramp and noise.

Used by ``flybox simulate``/``flybox demo``, by the benchmarks and by the RELION parity tests.
Everything is seeded: the same seed gives the same files.

:class:`Acquisition` plays a microscope session over time: micrographs written in place in
several pieces with pauses (as acquisition software does, not atomically), a RELION
micrographs STAR with their CTF that grows (rewritten atomically), and one RELION coordinate
STAR per micrograph, usually after its micrograph, sometimes before it.

Image model: random "molecules" (sums of Gaussian blobs inside a disc) are stamped at the pick
positions, the whole image is convolved with its CTF, and a mean offset, a gentle linear ramp
and Gaussian noise are added, so that every extraction option (normalisation, ramp removal,
phase flip, borders) has something to act on. Picks are the true centres with sub-pixel
fractions; some lie near or across the micrograph edge.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from flybox.io.coords import write_coordinates_star
from flybox.io.mrc import write_micrograph
from flybox.io.star import write_star
from flybox.processors.ctf import ctf_grid
from flybox.processors.fft import irfftn_last, rfftn_last
from flybox.types import CtfParams

__all__ = [
    "Acquired",
    "Acquisition",
    "AcquisitionSettings",
    "SyntheticMicrograph",
    "copy_slowly",
    "synthetic_micrograph",
    "write_ctf_table",
    "write_dataset",
]

log = logging.getLogger(__name__)


@dataclass
class SyntheticMicrograph:
    """One simulated micrograph and its truth."""

    image: npt.NDArray[np.float32]
    picks: pd.DataFrame
    ctf: CtfParams
    pixel_size_a: float


def _templates(count: int, radius: int, rng: np.random.Generator) -> npt.NDArray[np.float32]:
    size = 2 * radius + 1
    grid = np.arange(size) - radius
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    out = np.zeros((count, size, size), dtype=np.float32)
    for index in range(count):
        for _ in range(12):
            r = radius * 0.7 * np.sqrt(rng.uniform())
            angle = rng.uniform(0, 2 * np.pi)
            cy, cx = r * np.sin(angle), r * np.cos(angle)
            width = rng.uniform(0.08, 0.2) * radius
            out[index] += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)).astype(
                np.float32
            )
    return out


def synthetic_micrograph(
    shape: tuple[int, int] | int,
    n_particles: int,
    *,
    pixel_size_a: float = 1.0,
    particle_radius_px: int | None = None,
    snr: float = 0.1,
    edge_fraction: float = 0.1,
    rng: np.random.Generator | int | None = None,
) -> SyntheticMicrograph:
    """Simulate one micrograph.

    Parameters
    ----------
    shape
        ``(ny, nx)`` in pixels, or one size for a square micrograph.
    n_particles
        Number of particles (and picks).
    pixel_size_a
        Pixel size in Å.
    particle_radius_px
        Radius of the simulated molecules (default: ``min(shape) // 40``, at least 8).
    snr
        Signal variance over noise variance.
    edge_fraction
        Fraction of picks placed within one particle radius of an edge (some boxes cross it).
    rng
        Seed or generator.
    """
    rng = np.random.default_rng(rng)
    ny, nx = (shape, shape) if isinstance(shape, int) else shape
    radius = particle_radius_px or max(8, min(ny, nx) // 40)
    templates = _templates(8, radius, rng)
    n_edge = round(n_particles * edge_fraction)
    xs = rng.uniform(radius, nx - radius, n_particles)
    ys = rng.uniform(radius, ny - radius, n_particles)
    if n_edge:
        side = rng.integers(0, 4, n_edge)
        depth = rng.uniform(0, radius, n_edge)
        xs[:n_edge] = np.where(side == 0, depth, np.where(side == 1, nx - 1 - depth, xs[:n_edge]))
        ys[:n_edge] = np.where(side == 2, depth, np.where(side == 3, ny - 1 - depth, ys[:n_edge]))
    clean = np.zeros((ny, nx), dtype=np.float32)
    size = 2 * radius + 1
    for x, y, k in zip(xs, ys, rng.integers(0, len(templates), n_particles), strict=True):
        r0, c0 = int(y) - radius, int(x) - radius
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + size, ny), min(c0 + size, nx)
        clean[rs:re, cs:ce] += templates[k][rs - r0 : re - r0, cs - c0 : ce - c0]
    defocus = rng.uniform(8000.0, 25000.0)
    ctf = CtfParams(
        defocus_u_a=defocus + rng.uniform(0, 600),
        defocus_v_a=defocus,
        defocus_angle_deg=rng.uniform(-90.0, 90.0),
        voltage_kv=300.0,
        cs_mm=2.7,
        amplitude_contrast=0.1,
    )
    spectrum = rfftn_last(clean)
    spectrum *= ctf_grid((ny, nx), pixel_size_a, ctf).astype(np.float32)
    signal = irfftn_last(spectrum, (ny, nx)).astype(np.float32)
    noise_sigma = float(signal.std()) / np.sqrt(snr) if signal.std() > 0 else 1.0
    image = signal
    image += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(noise_sigma)
    ramp = (np.arange(nx, dtype=np.float32) / nx)[None, :] * np.float32(0.5 * noise_sigma)
    image += ramp + np.float32(100.0 * noise_sigma)
    picks = pd.DataFrame({"rlnCoordinateX": xs, "rlnCoordinateY": ys})
    return SyntheticMicrograph(image, picks, ctf, pixel_size_a)


def write_dataset(
    folder: str | os.PathLike[str],
    n_micrographs: int,
    *,
    shape: tuple[int, int] | int = 1024,
    n_particles: int = 50,
    pixel_size_a: float = 1.0,
    seed: int = 0,
    coord_suffix: str = "_autopick.star",
) -> Path:
    """Write a RELION-style dataset: micrographs, coordinate STARs and a CTF micrographs STAR.

    Layout (RELION project-relative paths, ``folder`` is the project folder)::

        folder/Micrographs/mic000.mrc
        folder/AutoPick/Micrographs/mic000_autopick.star
        folder/micrographs_ctf.star          (data_optics + data_micrographs with CTF)

    Returns the path of ``micrographs_ctf.star``.
    """
    root = Path(folder)
    (root / "Micrographs").mkdir(parents=True, exist_ok=True)
    (root / "AutoPick" / "Micrographs").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_micrographs):
        mic = synthetic_micrograph(shape, n_particles, pixel_size_a=pixel_size_a, rng=rng)
        name = f"Micrographs/mic{index:03d}.mrc"
        write_micrograph(root / name, mic.image, pixel_size_a)
        write_coordinates_star(
            root / "AutoPick" / "Micrographs" / f"mic{index:03d}{coord_suffix}", mic.picks
        )
        rows.append(_ctf_row(name, mic.ctf))
    star = root / "micrographs_ctf.star"
    write_ctf_table(star, rows, pixel_size_a)
    return star


def _ctf_row(name: str, ctf: CtfParams) -> dict[str, object]:
    return {
        "rlnMicrographName": name,
        "rlnOpticsGroup": 1,
        "rlnDefocusU": ctf.defocus_u_a,
        "rlnDefocusV": ctf.defocus_v_a,
        "rlnDefocusAngle": ctf.defocus_angle_deg,
        "rlnCtfBfactor": 0.0,
        "rlnCtfScalefactor": 1.0,
        "rlnPhaseShift": 0.0,
    }


def write_ctf_table(
    path: str | os.PathLike[str], rows: list[dict[str, object]], pixel_size_a: float
) -> None:
    """Write a RELION micrographs STAR with CTF (``data_optics`` + ``data_micrographs``),
    atomically (300 kV, Cs 2.7 mm, Q0 0.1)."""
    optics = pd.DataFrame(
        [
            {
                "rlnOpticsGroupName": "opticsGroup1",
                "rlnOpticsGroup": 1,
                "rlnMicrographPixelSize": pixel_size_a,
                "rlnVoltage": 300.0,
                "rlnSphericalAberration": 2.7,
                "rlnAmplitudeContrast": 0.1,
            }
        ]
    )
    write_star(path, {"optics": optics, "micrographs": pd.DataFrame(rows)})


def copy_slowly(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    chunks: int = 4,
    pause_seconds: float = 0.05,
) -> None:
    """Copy a file in place in ``chunks`` pieces with pauses, as acquisition software writes
    (readers can see the file while it is incomplete)."""
    size = os.path.getsize(source)
    piece = max(1, -(-size // max(chunks, 1)))
    with open(source, "rb") as src, open(target, "wb") as dst:
        while data := src.read(piece):
            dst.write(data)
            dst.flush()
            if dst.tell() < size and pause_seconds > 0:
                time.sleep(pause_seconds)


@dataclass(frozen=True)
class AcquisitionSettings:
    """What :class:`Acquisition` writes.

    Attributes
    ----------
    micrographs
        How many micrographs.
    rate_per_minute
        Micrographs per minute.
    size
        Micrograph size in pixels (square).
    particles
        Particles (picks) per micrograph.
    pixel_size_a
        Pixel size in Å.
    seed
        Random seed.
    chunks, chunk_pause_seconds
        Each micrograph is written in this many pieces with this pause in between.
    picks_first_every
        Every n-th micrograph has its picks written before it (0: never).
    pool
        Simulate only this many distinct micrographs up front and copy them in turn (for fast
        rates of large micrographs); ``None``: simulate each one when it is due.
    coord_suffix
        Coordinate file suffix.
    """

    micrographs: int = 20
    rate_per_minute: float = 30.0
    size: int = 1024
    particles: int = 100
    pixel_size_a: float = 1.0
    seed: int = 0
    chunks: int = 4
    chunk_pause_seconds: float = 0.05
    picks_first_every: int = 5
    pool: int | None = None
    coord_suffix: str = "_autopick.star"


@dataclass(frozen=True)
class Acquired:
    """One micrograph written by :class:`Acquisition`.

    ``written_at`` is the wall-clock time (``time.time()``) at which its last byte was written.
    """

    index: int
    path: Path
    picks_path: Path
    picks: int
    written_at: float


@dataclass
class _Source:
    mrc: Path
    picks: pd.DataFrame
    ctf: CtfParams


@dataclass
class Acquisition:
    """A synthetic microscope session written over time (blocking: run it in a thread or a
    process; :meth:`stop` from another thread ends it early).

    Layout under ``folder``::

        Micrographs/mic0000.mrc              written in place, in pieces
        AutoPick/mic0000_autopick.star       RELION coordinate STAR
        micrographs_ctf.star                 RELION micrographs STAR with CTF (grows)
    """

    folder: Path
    settings: AcquisitionSettings = field(default_factory=AcquisitionSettings)
    written: list[Acquired] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def stop(self) -> None:
        """End the acquisition before the next micrograph."""
        self._stop.set()

    @property
    def micrographs_dir(self) -> Path:
        """Where micrographs appear."""
        return self.folder / "Micrographs"

    @property
    def picks_dir(self) -> Path:
        """Where coordinate files appear."""
        return self.folder / "AutoPick"

    @property
    def ctf_path(self) -> Path:
        """The micrographs STAR with CTF."""
        return self.folder / "micrographs_ctf.star"

    def _simulate(self, staging: Path, index: int, rng: np.random.Generator) -> _Source:
        s = self.settings
        mic = synthetic_micrograph(s.size, s.particles, pixel_size_a=s.pixel_size_a, rng=rng)
        path = staging / f"source{index:04d}.mrc"
        write_micrograph(path, mic.image, s.pixel_size_a)
        return _Source(path, mic.picks, mic.ctf)

    def run(self, on_written: Callable[[Acquired], None] | None = None) -> list[Acquired]:
        """Write the session, one micrograph every ``60 / rate_per_minute`` seconds.

        Parameters
        ----------
        on_written
            Called after each micrograph and its picks are written.

        Returns
        -------
        list of Acquired
            What was written (also in :attr:`written`).
        """
        s = self.settings
        self.micrographs_dir.mkdir(parents=True, exist_ok=True)
        self.picks_dir.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(s.seed)
        interval = 60.0 / s.rate_per_minute if s.rate_per_minute > 0 else 0.0
        staging = Path(tempfile.mkdtemp(prefix="flybox-simulate-"))
        ctf_rows: list[dict[str, object]] = []
        try:
            pool = [self._simulate(staging, i, rng) for i in range(s.pool or 0)]
            started = time.monotonic()
            for index in range(s.micrographs):
                source = pool[index % len(pool)] if pool else self._simulate(staging, 0, rng)
                delay = started + index * interval - time.monotonic()
                if self._stop.wait(max(delay, 0.0)):
                    break
                self.written.append(self._write_one(index, source, ctf_rows))
                if on_written is not None:
                    on_written(self.written[-1])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.written

    def _write_one(
        self, index: int, source: _Source, ctf_rows: list[dict[str, object]]
    ) -> Acquired:
        s = self.settings
        name = f"mic{index:04d}"
        mrc = self.micrographs_dir / f"{name}.mrc"
        picks = self.picks_dir / f"{name}{s.coord_suffix}"
        picks_first = (
            s.picks_first_every > 0 and index % s.picks_first_every == s.picks_first_every - 1
        )
        if picks_first:
            write_coordinates_star(picks, source.picks)
        copy_slowly(source.mrc, mrc, chunks=s.chunks, pause_seconds=s.chunk_pause_seconds)
        written_at = time.time()
        ctf_rows.append(_ctf_row(f"Micrographs/{name}.mrc", source.ctf))
        write_ctf_table(self.ctf_path, ctf_rows, s.pixel_size_a)
        if not picks_first:
            write_coordinates_star(picks, source.picks)
        log.debug("wrote %s (%d picks)", mrc, len(source.picks))
        return Acquired(index, mrc, picks, len(source.picks), written_at)

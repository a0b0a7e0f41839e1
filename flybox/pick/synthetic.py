"""Synthetic micrographs for the picker's tests and benchmark: true particles among
look-alike decoys at a low signal-to-noise ratio.

A particle is a dark, compact, asymmetric molecule of four overlapping lobes within the
particle's diameter, at a random in-plane rotation. Decoys: thin rings and uniform disks of the
particle's diameter, aggregates (clumps of 4-7 particle-sized lobes, about twice as wide) and
small ice spots (bright or dark, a fifth of the diameter). Background: white noise of σ = 1 on
a slow ice-thickness gradient. At the default amplitude single particles are barely visible
without filtering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["SyntheticMicrograph", "match_picks", "synthetic_micrograph"]

_LOBES = np.array([[0.0, 0.0], [0.45, 0.1], [-0.2, 0.42], [-0.25, -0.4]])
_LOBE_WIDTHS = np.array([0.3, 0.22, 0.2, 0.18])
_LOBE_WEIGHTS = np.array([1.0, 0.8, 0.7, 0.6])


@dataclass(frozen=True)
class SyntheticMicrograph:
    """``image`` ``(ny, nx)`` float32 and ``particles`` ``(n, 2)`` true centres (x, y)."""

    image: npt.NDArray[np.float32]
    particles: npt.NDArray[np.float64]


def _splat(
    image: npt.NDArray[np.float64], x: float, y: float, reach: float, values: object
) -> tuple[slice, slice, npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    del values
    x0, x1 = max(0, int(x - reach)), min(image.shape[1], int(x + reach) + 1)
    y0, y1 = max(0, int(y - reach)), min(image.shape[0], int(y + reach) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return slice(y0, y1), slice(x0, x1), xx - x, yy - y


def _add_lobes(
    image: npt.NDArray[np.float64],
    x: float,
    y: float,
    radius: float,
    centres: npt.NDArray[np.float64],
    widths: npt.NDArray[np.float64],
    weights: npt.NDArray[np.float64],
    amplitude: float,
) -> None:
    rows, cols, dx, dy = _splat(image, x, y, 2.0 * radius, None)
    for (cx, cy), w, a in zip(centres, widths, weights, strict=True):
        sigma = w * radius
        image[rows, cols] -= (
            amplitude
            * a
            * np.exp(-((dx - cx * radius) ** 2 + (dy - cy * radius) ** 2) / (2 * sigma**2))
        )


def synthetic_micrograph(
    size: int = 1024,
    particle_size: float = 64,
    *,
    particles: int = 60,
    rings: int = 12,
    disks: int = 12,
    aggregates: int = 6,
    ice: int = 25,
    amplitude: float = 0.6,
    seed: int = 0,
) -> SyntheticMicrograph:
    """One synthetic micrograph with its true particle centres.

    Parameters
    ----------
    size
        Side in pixels (square).
    particle_size
        Particle diameter in pixels.
    particles, rings, disks, aggregates, ice
        How many of each object (objects do not overlap; fewer when the image is full).
    amplitude
        Peak darkness of a particle's main lobe, in units of the noise σ.
    seed
        Random seed.
    """
    rng = np.random.default_rng(seed)
    radius = particle_size / 2
    image = np.zeros((size, size), dtype=np.float64)
    kinds = ["p"] * particles + ["r"] * rings + ["d"] * disks + ["a"] * aggregates + ["i"] * ice
    rng.shuffle(kinds)
    placed: list[tuple[float, float, float]] = []
    truth: list[tuple[float, float]] = []
    for kind in kinds:
        extent = {"a": 2.0 * radius, "i": 0.4 * radius}.get(kind, radius)
        for _ in range(50):
            x, y = rng.uniform(extent + 2, size - extent - 2, size=2)
            if all(math.hypot(x - px, y - py) > extent + pe + 4 for px, py, pe in placed):
                break
        else:
            continue
        placed.append((x, y, extent))
        if kind == "p":
            angle = rng.uniform(0, 2 * math.pi)
            rotation = np.array(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
            )
            jitter = _LOBES + rng.normal(0, 0.04, _LOBES.shape)
            _add_lobes(
                image, x, y, radius, jitter @ rotation.T, _LOBE_WIDTHS, _LOBE_WEIGHTS, amplitude
            )
            truth.append((x, y))
        elif kind in "rd":
            rows, cols, dx, dy = _splat(image, x, y, 1.3 * radius, None)
            r = np.hypot(dx, dy)
            if kind == "r":
                profile = np.exp(-((r - 0.85 * radius) ** 2) / (2 * (0.1 * radius) ** 2))
                image[rows, cols] -= 0.9 * amplitude * profile
            else:
                profile = 1.0 / (1.0 + np.exp((r - 0.8 * radius) / (0.06 * radius)))
                image[rows, cols] -= 0.55 * amplitude * profile
        elif kind == "a":
            count = int(rng.integers(4, 8))
            centres = rng.normal(0, 0.7, size=(count, 2))
            widths = np.full(count, 0.4)
            _add_lobes(image, x, y, radius * 1.4, centres, widths, np.ones(count), amplitude * 1.2)
        else:
            rows, cols, dx, dy = _splat(image, x, y, 0.5 * radius, None)
            sign = 1.0 if rng.random() < 0.5 else -1.0
            spot = np.exp(-(dx**2 + dy**2) / (2 * (0.1 * radius) ** 2))
            image[rows, cols] += sign * 3.0 * amplitude * spot
    yy, xx = np.mgrid[0:size, 0:size] / size
    gx, gy = rng.normal(0, 0.5, size=2)
    image += gx * xx + gy * yy
    image += rng.normal(0, 1.0, size=image.shape)
    return SyntheticMicrograph(
        image=image.astype(np.float32), particles=np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    )


def match_picks(
    picks: npt.ArrayLike, truth: npt.ArrayLike, particle_size: float
) -> tuple[int, int, int]:
    """Greedy one-to-one matching within 0.5 × diameter, picks in the given order (best first).

    Returns
    -------
    true_positives, false_positives, false_negatives
    """
    from scipy.spatial import cKDTree

    p = np.asarray(picks, dtype=np.float64).reshape(-1, 2)
    t = np.asarray(truth, dtype=np.float64).reshape(-1, 2)
    if p.shape[0] == 0 or t.shape[0] == 0:
        return 0, p.shape[0], t.shape[0]
    tree = cKDTree(t)
    taken = np.zeros(t.shape[0], dtype=bool)
    hits = 0
    for candidates in tree.query_ball_point(p, r=0.5 * particle_size):
        free = [c for c in candidates if not taken[c]]
        if free:
            taken[free[0]] = True
            hits += 1
    return hits, p.shape[0] - hits, t.shape[0] - hits

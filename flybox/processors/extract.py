"""Cutting particle boxes out of a micrograph (ALGORITHMS.md §2, §3).

Box geometry: for an integer centre ``(cx, cy)`` and box ``N`` the box covers rows
``cy − N//2 … cy − N//2 + N − 1`` (same for columns), so the picked pixel lands on box index
``(N//2, N//2)``. The integer centre comes from the float pick by ``trunc`` (RELION, default),
``round`` (half away from zero, Xmipp) or ``floor``.

Border policy:

``fill`` (RELION)
    Boxes crossing the micrograph edge are kept. Outside pixels first hold the micrograph mean
    and are then replaced by the nearest inside pixel (index clamping). The replacement is left
    *pending* on the :class:`~flybox.processors.base.ParticleStack` so that a box-level phase
    flip sees the mean-padded box, exactly as ``relion_preprocess`` does.
``skip`` (cryoSPARC, Xmipp default)
    Boxes with any pixel outside are excluded and counted.

Boxes entirely outside the micrograph are always excluded (RELION stops with an error there).
Every particle row gets ``flyboxBorderFraction``: the fraction of its box outside the
micrograph (0 for interior particles).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pydantic import Field

from flybox.processors.base import (
    Extractor,
    Micrograph,
    ParticleStack,
    StepSettings,
)
from flybox.processors.coordinates import integer_centres
from flybox.processors.edges import apply_edge_fill, partial_windows
from flybox.processors.fft import empty_aligned

__all__ = ["ExtractSettings", "ExtractStep", "box_windows"]


class ExtractSettings(StepSettings):
    """Settings of the ``extract`` step.

    Attributes
    ----------
    box
        Box size in micrograph pixels (odd sizes are allowed; the RELION convention refuses
        them earlier, at configuration time).
    border
        ``fill`` keeps boxes crossing the edge (nearest-pixel fill), ``skip`` drops them.
    center_rounding
        How a float pick becomes the integer box centre: ``trunc`` (RELION), ``round`` (half
        away from zero, Xmipp) or ``floor``.
    local_average
        Add ``flyboxLocalAverage``: the mean of each box before any normalisation, in the
        micrograph's intensity units (Xmipp's ``localAverage``, ALGORITHMS.md §12.2).
    """

    box: int = Field(ge=2, le=8192)
    border: Literal["fill", "skip"] = "fill"
    center_rounding: Literal["trunc", "round", "floor"] = "trunc"
    local_average: bool = False


def box_windows(
    cx: npt.NDArray[np.int64], cy: npt.NDArray[np.int64], box: int, shape: tuple[int, int]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Corners, valid windows and outside fractions of boxes centred on integer positions.

    Parameters
    ----------
    cx, cy
        Integer box centres in micrograph pixels (column, row).
    box
        Box size in pixels.
    shape
        Micrograph ``(ny, nx)``.

    Returns
    -------
    corners
        ``(n, 2)`` top-left ``(row, col)`` of each box in the micrograph.
    windows
        ``(n, 4)`` valid ``[y0, y1, x0, x1)`` of each box in box coordinates; empty
        (``y1 <= y0`` or ``x1 <= x0``) when the box is entirely outside.
    inside
        ``(n,)`` number of box pixels inside the micrograph.
    """
    ny, nx = shape
    half = box // 2
    r0 = cy - half
    c0 = cx - half
    y0 = np.clip(-r0, 0, box)
    y1 = np.clip(ny - r0, 0, box)
    x0 = np.clip(-c0, 0, box)
    x1 = np.clip(nx - c0, 0, box)
    inside = np.maximum(y1 - y0, 0) * np.maximum(x1 - x0, 0)
    corners = np.stack([r0, c0], axis=1)
    windows = np.stack([y0, y1, x0, x1], axis=1)
    return corners, windows, inside


class ExtractStep(Extractor[ExtractSettings]):
    """Cut ``box``-sized particles centred on the picks (stream ``particles``)."""

    name: ClassVar[str] = "extract"
    Settings: ClassVar[type[StepSettings]] = ExtractSettings

    @property
    def box(self) -> int:
        """Extraction box size in micrograph pixels."""
        return self.settings.box

    def apply(self, micrograph: Micrograph) -> tuple[ParticleStack, int]:
        """Extract every pick of ``micrograph``; returns the stack and the border exclusions."""
        box = self.settings.box
        picks = micrograph.picks
        xs = picks["rlnCoordinateX"].to_numpy(dtype=np.float64)
        ys = picks["rlnCoordinateY"].to_numpy(dtype=np.float64)
        cx, cy = integer_centres(xs, ys, self.settings.center_rounding)
        corners, windows, inside = box_windows(cx, cy, box, micrograph.shape)
        full = box * box
        keep = inside > 0
        if self.settings.border == "skip":
            keep &= inside == full
        excluded = int(len(picks) - np.count_nonzero(keep))
        kept = np.flatnonzero(keep)

        images = empty_aligned((kept.size, box, box), np.float32)
        image = micrograph.image
        crossing = inside[kept] < full
        for out_index, pick_index in enumerate(kept):
            r0, c0 = (int(v) for v in corners[pick_index])
            y0, y1, x0, x1 = (int(v) for v in windows[pick_index])
            if crossing[out_index]:
                # Outside pixels are filled later (pending fill); until then they hold the
                # micrograph mean, set lazily by the stack when a step needs unfilled boxes.
                images[out_index] = 0.0
            images[out_index, y0:y1, x0:x1] = image[r0 + y0 : r0 + y1, c0 + x0 : c0 + x1]

        pending = windows[kept] if bool(np.any(crossing)) else None
        columns: dict[str, Any] = {name: picks[name].to_numpy()[kept] for name in picks.columns}
        columns["rlnMicrographName"] = np.full(kept.size, micrograph.name, dtype=object)
        columns["flyboxBorderFraction"] = 1.0 - inside[kept] / full
        if self.settings.local_average:
            columns["flyboxLocalAverage"] = _box_means(images, pending)
        table = pd.DataFrame(columns, copy=False)
        stack = ParticleStack(
            table=table,
            pixel_size_a=micrograph.pixel_size_a,
            extraction_box=box,
            box=box,
            images=images,
            pending_fill=pending,
            ctf=micrograph.ctf,
            outside_value=(lambda: micrograph.mean) if pending is not None else None,
        )
        return stack, excluded


def _box_means(
    images: npt.NDArray[np.float32], pending: npt.NDArray[np.int64] | None
) -> npt.NDArray[Any]:
    """Mean of each box as it will look after the border fill (float64)."""
    means: npt.NDArray[np.float64] = images.mean(axis=(1, 2), dtype=np.float64)
    if pending is not None:
        partial = partial_windows(pending, images.shape[-1])
        if partial.size:
            filled = apply_edge_fill(images[partial], pending[partial])
            means[partial] = filled.mean(axis=(1, 2), dtype=np.float64)
    return means


def picks_frame(x: npt.ArrayLike, y: npt.ArrayLike) -> pd.DataFrame:
    """A minimal picks table from coordinate arrays (tests, simulator)."""
    return pd.DataFrame(
        {
            "rlnCoordinateX": np.asarray(x, dtype=np.float64),
            "rlnCoordinateY": np.asarray(y, dtype=np.float64),
        }
    )

"""Pick coordinates: integer centres, rescaling and re-centring (ALGORITHMS.md §2, §9, §10).

Conventions
-----------
* Coordinates are in pixels of the micrograph they refer to, array frame: ``x`` is the
  column, ``y`` the row, 0-based (ALGORITHMS.md §0.2, §14).
* ``ROUND`` is round half away from zero, as in RELION and Xmipp; :func:`numpy.round`
  rounds half to even and is never used for coordinates.
* RELION's sign convention for origins: the true particle centre in micrograph pixels is
  ``rlnCoordinateX − rlnOriginXAngst / p_mic`` (the same for y).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = [
    "euler_matrix_relion",
    "integer_centres",
    "recenter_picks",
    "rescale_coordinates",
    "round_half_away",
]

FloatArray = npt.NDArray[np.float64]
Rounding = Literal["trunc", "round", "floor"]


def round_half_away(x: npt.ArrayLike) -> FloatArray:
    """Round half away from zero (C's ``round``; RELION's and Xmipp's ``ROUND``).

    Exact for every double: ties are detected on ``x − trunc(x)``, which is computed
    without rounding error, so 0.49999999999999994 rounds to 0 and 2.5 to 3.

    Parameters
    ----------
    x
        Values to round (any shape).

    Returns
    -------
    numpy.ndarray
        float64 array of the rounded values (same shape as ``x``).
    """
    values = np.asarray(x, dtype=np.float64)
    truncated = np.trunc(values)
    nearest = np.round(values)
    tie = np.abs(values - truncated) == 0.5
    result: FloatArray = np.where(tie, truncated + np.sign(values), nearest)
    return result


def integer_centres(
    x: npt.ArrayLike, y: npt.ArrayLike, rounding: Rounding
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Integer box centres of continuous pick positions (ALGORITHMS.md §2).

    Parameters
    ----------
    x, y
        Pick positions in micrograph pixels (columns, rows).
    rounding
        ``trunc``: C cast towards zero (RELION, the default); ``round``: half away from zero
        (Xmipp's scissor); ``floor``: towards −∞.

    Returns
    -------
    tuple of numpy.ndarray
        ``(cx, cy)`` as int64 arrays.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if rounding == "trunc":
        cx, cy = np.trunc(xs), np.trunc(ys)
    elif rounding == "round":
        cx, cy = round_half_away(xs), round_half_away(ys)
    elif rounding == "floor":
        cx, cy = np.floor(xs), np.floor(ys)
    else:
        raise ValueError(f"unknown rounding {rounding!r}; use trunc, round or floor")
    return cx.astype(np.int64), cy.astype(np.int64)


def rescale_coordinates(picks: pd.DataFrame, factor: float) -> pd.DataFrame:
    """Bring pick coordinates from the picking frame into the micrograph frame (§10).

    Parameters
    ----------
    picks
        Table with ``rlnCoordinateX`` and ``rlnCoordinateY`` in picking-image pixels.
    factor
        Picking pixel size / micrograph pixel size (e.g. 4 for picks made on a 4× binned
        image). Coordinates are multiplied as floats and **not** rounded: rounding happens
        once, at extraction (unlike Scipion's ``int(x·f)``, which biases by up to a pixel).

    Returns
    -------
    pandas.DataFrame
        A copy with float64 coordinates; other columns untouched.
    """
    out = picks.copy()
    for column in ("rlnCoordinateX", "rlnCoordinateY"):
        out[column] = picks[column].to_numpy(dtype=np.float64) * float(factor)
    return out


def euler_matrix_relion(
    rot_deg: npt.ArrayLike, tilt_deg: npt.ArrayLike, psi_deg: npt.ArrayLike
) -> FloatArray:
    """RELION's ``Euler_angles2matrix(rot, tilt, psi)`` (ZYZ), batched.

    ``A = R_z(psi) · R_y(tilt) · R_z(rot)`` with RELION's (passive) rotation matrices; it maps
    a point of the reference to the projection frame, so the image of a 3D point ``c`` is
    ``(A·c)_{x,y}``. RELION's re-extraction and ``relion_star_handler --center`` use ``A·c``
    without transposition (preprocessing.cpp getCoordinateMetaDataTable; euler.cpp).

    Parameters
    ----------
    rot_deg, tilt_deg, psi_deg
        ``rlnAngleRot``, ``rlnAngleTilt``, ``rlnAnglePsi`` in degrees (broadcast together).

    Returns
    -------
    numpy.ndarray
        ``(..., 3, 3)`` float64 matrices.
    """
    alpha = np.deg2rad(np.asarray(rot_deg, dtype=np.float64))
    beta = np.deg2rad(np.asarray(tilt_deg, dtype=np.float64))
    gamma = np.deg2rad(np.asarray(psi_deg, dtype=np.float64))
    alpha, beta, gamma = np.broadcast_arrays(alpha, beta, gamma)
    ca, sa = np.cos(alpha), np.sin(alpha)
    cb, sb = np.cos(beta), np.sin(beta)
    cg, sg = np.cos(gamma), np.sin(gamma)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    matrix = np.empty((*alpha.shape, 3, 3), dtype=np.float64)
    matrix[..., 0, 0] = cg * cc - sg * sa
    matrix[..., 0, 1] = cg * cs + sg * ca
    matrix[..., 0, 2] = -cg * sb
    matrix[..., 1, 0] = -sg * cc - cg * sa
    matrix[..., 1, 1] = -sg * cs + cg * ca
    matrix[..., 1, 2] = sg * sb
    matrix[..., 2, 0] = sc
    matrix[..., 2, 1] = ss
    matrix[..., 2, 2] = cb
    return matrix


def _origins_angstrom(
    particles: pd.DataFrame, particle_pixel_size_a: FloatArray
) -> tuple[FloatArray, FloatArray]:
    if {"rlnOriginXAngst", "rlnOriginYAngst"} <= set(particles.columns):
        return (
            particles["rlnOriginXAngst"].to_numpy(dtype=np.float64),
            particles["rlnOriginYAngst"].to_numpy(dtype=np.float64),
        )
    if {"rlnOriginX", "rlnOriginY"} <= set(particles.columns):
        # RELION 3.0 stored origins in pixels of the particle images.
        return (
            particles["rlnOriginX"].to_numpy(dtype=np.float64) * particle_pixel_size_a,
            particles["rlnOriginY"].to_numpy(dtype=np.float64) * particle_pixel_size_a,
        )
    raise ValueError("re-centring needs rlnOriginXAngst/rlnOriginYAngst (or rlnOriginX/Y)")


def recenter_picks(
    particles: pd.DataFrame,
    *,
    particle_pixel_size_a: float | npt.NDArray[np.floating],
    micrograph_pixel_size_a: float,
    recenter_xyz: tuple[float, float, float] = (0.0, 0.0, 0.0),
    ref_pixel_size_a: float | None = None,
) -> pd.DataFrame:
    """RELION's re-extraction re-centring (``--recenter``), ALGORITHMS.md §9.1.

    For each particle, with ``p_part`` = particle pixel size and ``p_mic`` = micrograph pixel
    size::

        o      = OriginAngst / p_part − P                 (particle px)
        o_mic  = o · p_part / p_mic                       (micrograph px)
        X'     = X − ROUND(o_mic)
        Origin'= p_mic · (o_mic − ROUND(o_mic))           (Å, residual in [−½, ½] px)

    ``P = (A(rot, tilt, psi) · c)_{x,y}`` with ``c = recenter_xyz · (ref_pixel_size_a /
    p_part)`` (the factor only when ``ref_pixel_size_a > 0``) and ``A`` from
    :func:`euler_matrix_relion`, applied without transposition as RELION does. ``P = 0``
    when the recentre point is ``(0, 0, 0)``. ROUND is half away from zero. The true centre
    ``X − Origin/p_mic`` is preserved (shifted by P·p_part/p_mic when a point is given).

    Parameters
    ----------
    particles
        Particle rows with ``rlnCoordinateX/Y`` (micrograph px) and ``rlnOriginXAngst/YAngst``
        (Å), or RELION 3.0's ``rlnOriginX/Y`` (particle px, converted with ``p_part``).
        ``rlnAngleRot/Tilt/Psi`` (degrees) are read when a recentre point is given; a
        missing angle column counts as 0° (2D data carry only ``rlnAnglePsi``).
    particle_pixel_size_a
        Pixel size of the particle images in Å (``rlnImagePixelSize`` of each row's optics
        group): a scalar or one value per row.
    micrograph_pixel_size_a
        Pixel size of the micrograph the particles are re-extracted from, in Å.
    recenter_xyz
        Point of the reference to centre on, in pixels of the reference (``--recenter_x/y/z``).
    ref_pixel_size_a
        Pixel size of the reference in Å (``--ref_angpix``); ``None`` or ≤ 0 means the
        reference has the particles' pixel size.

    Returns
    -------
    pandas.DataFrame
        A copy with new float64 ``rlnCoordinateX/Y`` and residual ``rlnOriginXAngst/YAngst``
        in Å. RELION 3.0 pixel origins ``rlnOriginX/Y`` are replaced by the Å columns; all
        other columns are untouched.

    Raises
    ------
    ValueError
        When the coordinate or origin columns are missing, or a pixel size is not positive.
    """
    n = len(particles)
    p_part = np.broadcast_to(np.asarray(particle_pixel_size_a, dtype=np.float64), (n,))
    p_mic = float(micrograph_pixel_size_a)
    if p_mic <= 0 or np.any(p_part <= 0):
        raise ValueError("pixel sizes must be positive")
    if not {"rlnCoordinateX", "rlnCoordinateY"} <= set(particles.columns):
        raise ValueError("re-centring needs rlnCoordinateX and rlnCoordinateY")
    origin_x, origin_y = _origins_angstrom(particles, p_part)

    ox = origin_x / p_part
    oy = origin_y / p_part
    centre = np.asarray(recenter_xyz, dtype=np.float64)
    if np.any(np.abs(centre) > 0.0):
        centre_px = np.broadcast_to(centre, (n, 3))
        if ref_pixel_size_a is not None and ref_pixel_size_a > 0:
            centre_px = centre_px * (float(ref_pixel_size_a) / p_part)[:, None]
        angles = [
            particles[column].to_numpy(dtype=np.float64) if column in particles else np.zeros(n)
            for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
        ]
        projected = np.einsum("nij,nj->ni", euler_matrix_relion(*angles), centre_px)
        ox = ox - projected[:, 0]
        oy = oy - projected[:, 1]
    ox_mic = ox * (p_part / p_mic)
    oy_mic = oy * (p_part / p_mic)
    shift_x = round_half_away(ox_mic)
    shift_y = round_half_away(oy_mic)

    out = particles.drop(columns=["rlnOriginX", "rlnOriginY"], errors="ignore").copy()
    out["rlnCoordinateX"] = particles["rlnCoordinateX"].to_numpy(dtype=np.float64) - shift_x
    out["rlnCoordinateY"] = particles["rlnCoordinateY"].to_numpy(dtype=np.float64) - shift_y
    out["rlnOriginXAngst"] = p_mic * (ox_mic - shift_x)
    out["rlnOriginYAngst"] = p_mic * (oy_mic - shift_y)
    return out

"""Geometric masks for particles (2D) and volumes (3D): shapes, conventions and defaults.

Every mask the Xmipp "apply 2D/3D mask" protocols offer is built here, in two conventions
(ALGORITHMS.md §11, §17 rows 12-14):

``relion``
    Radial boundaries are strict (``d < R``) and soft edges lie entirely *outside*
    ``[inner, outer]``: the raised crown equals ``relion_mask_create --denovo``
    (``raisedCrownMask``). The gaussian has peak 1.
``xmipp``
    Binary boundaries are inclusive (``r² ≤ R²``) and the raised crown's soft edges of width
    ``2·decay`` are *centred on* the radii (``xmipp_transform_mask``). The gaussian is a
    normalised density ``(√(2π)·σ)^-dim · exp(-r²/2σ²)`` (peak not 1).

Coordinates are logical: on an axis of length N the centre is index ``N//2`` (ALGORITHMS.md
§0.2), shifted by ``center = (x, y[, z])`` pixels. Masks are computed in float64 and returned
as float32 arrays ``(ny, nx)`` or ``(nz, ny, nx)``; value 1 keeps a pixel.

Shapes (aliases in brackets) and the parameters they take, all in pixels; omitted or -1 means
the Xmipp/Scipion default, with ``S`` the smallest image dimension:

=================  ================================  ========================================
shape              parameters                         defaults
=================  ================================  ========================================
circular [sphere]  radius                             ``S//2``
box [rectangular]  size (full side: 1 value or x y z) ``n//2`` on each axis
crown              inner, outer                       ``0``, ``S//2``
cylinder (3D)      radius, height (axis along Z)      ``min(nx, ny)//2``, ``nz``
gaussian           sigma                              ``S/6``
raised_cosine      inner, outer                       ``0``, ``S//2``
raised_crown       inner, outer, decay                ``0``, ``S//2``, ``0``
=================  ================================  ========================================

The first four are *binary* (0/1; removed pixels take a fill value), the last three *soft*
(they multiply); see :func:`flybox.processors.mask.apply_mask`.

Xmipp's raised crown follows its analytic definition ``[1 - RC(r; R1-w, R1+w)]·RC(r; R2-w,
R2+w)`` (§11.1). Xmipp's own code compares squared radii, which for ``inner < decay`` also
zeroes the centre ``r ≤ |inner - decay|``; that artefact is not reproduced. Xmipp's sign
convention (negative parameters = keep the inside) maps onto ``invert``: masks keep the
inside unless ``invert`` is set, and ``-1`` always means "default".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import ValidationInfo, field_validator

from flybox.errors import ConfigError
from flybox.processors.base import StepSettings

__all__ = [
    "BINARY_SHAPES",
    "SHAPE_ALIASES",
    "SHAPE_PARAMETERS",
    "Convention",
    "FillMode",
    "MaskGeometry",
    "MaskSettings",
    "ShapeName",
    "build_mask",
    "mask_2d",
    "mask_3d",
]

FloatArray = npt.NDArray[np.float32]
ShapeName = Literal[
    "circular", "box", "crown", "cylinder", "gaussian", "raised_cosine", "raised_crown"
]
FillMode = Literal["value", "min", "max", "avg", "soft_background"]
Convention = Literal["relion", "xmipp"]

#: Other accepted spellings of the shape names (Xmipp's and the issue's words).
SHAPE_ALIASES: dict[str, ShapeName] = {
    "sphere": "circular",
    "circle": "circular",
    "rectangular": "box",
    "rectangle": "box",
    "cube": "box",
    "square": "box",
}
#: Which size parameters each shape takes.
SHAPE_PARAMETERS: dict[str, tuple[str, ...]] = {
    "circular": ("radius",),
    "box": ("size",),
    "crown": ("inner", "outer"),
    "cylinder": ("radius", "height"),
    "gaussian": ("sigma",),
    "raised_cosine": ("inner", "outer"),
    "raised_crown": ("inner", "outer", "decay"),
}
#: Shapes whose masks are 0/1 and therefore use the substitution fills.
BINARY_SHAPES = frozenset({"circular", "box", "crown", "cylinder"})


def _check_applies(info: ValidationInfo) -> None:
    """Refuse a size parameter that the (already validated) shape does not take."""
    shape = info.data.get("shape")
    name = str(info.field_name)
    if shape is not None and name not in SHAPE_PARAMETERS[shape]:
        takes = ", ".join(SHAPE_PARAMETERS[shape])
        raise ValueError(f"does not apply to shape {shape} (it takes {takes})")


class MaskSettings(StepSettings):
    """A geometric mask and how to apply it; shared by the ``mask`` step and ``flybox mask``.

    Attributes
    ----------
    shape
        Shape name or alias (see the module docstring); stored canonically.
    radius, inner, outer, sigma, decay, height
        Pixels; ``None`` or -1 gives the default for the image size. ``decay`` is the raised
        crown's soft-edge width (``relion``: the whole edge; ``xmipp``: half of it).
    size
        Full side(s) of a box in pixels: one value for every axis, or ``(x, y[, z])``.
    center
        Shift ``(x, y[, z])`` of the mask centre from the image centre ``N//2``, in pixels.
    fill
        ``value`` (default), ``min``, ``max``, ``avg`` (binary masks only) or
        ``soft_background`` (any mask). Soft masks without a fill multiply.
    fill_value
        Value of the ``value`` fill.
    convention
        ``relion`` (default) or ``xmipp``.
    gaussian_norm
        ``peak`` (peak 1) or ``density`` (Xmipp's normalised density); default by convention.
    invert
        Keep the outside instead (Xmipp's OUTSIDE mode; RELION's ``--invert``).
    """

    shape: ShapeName
    radius: float | None = None
    inner: float | None = None
    outer: float | None = None
    sigma: float | None = None
    decay: float | None = None
    size: tuple[int, ...] | None = None
    height: float | None = None
    center: tuple[float, ...] = (0.0, 0.0)
    fill: FillMode | None = None
    fill_value: float = 0.0
    convention: Convention = "relion"
    gaussian_norm: Literal["peak", "density"] | None = None
    invert: bool = False

    @field_validator("shape", mode="before")
    @classmethod
    def _canonical_shape(cls, value: Any) -> Any:
        if isinstance(value, str):
            name = value.strip().lower().replace("-", "_").replace(" ", "_")
            return SHAPE_ALIASES.get(name, name)
        return value

    @field_validator("radius", "inner", "outer", "decay", "height", mode="after")
    @classmethod
    def _length(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None or value == -1:
            return None
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a length >= 0 in pixels, or -1 for the default")
        _check_applies(info)
        inner = info.data.get("inner")
        if info.field_name == "outer" and inner is not None and inner > value:
            raise ValueError(f"must not be smaller than inner ({inner:g} > {value:g})")
        return value

    @field_validator("sigma", mode="after")
    @classmethod
    def _sigma(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None or value == -1:
            return None
        if not math.isfinite(value) or value <= 0:
            raise ValueError("must be > 0 pixels, or -1 for the default")
        _check_applies(info)
        return value

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any, info: ValidationInfo) -> Any:
        values = [value] if isinstance(value, int | float) else value
        if values is None or list(values) == [-1]:
            return None
        values = list(values)
        if not 1 <= len(values) <= 3 or any(float(v) != int(v) or v <= 0 for v in values):
            raise ValueError("must be 1 to 3 whole numbers of pixels > 0 (x y [z]), or -1")
        _check_applies(info)
        return tuple(int(v) for v in values)

    @field_validator("center", mode="after")
    @classmethod
    def _center(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) not in (2, 3) or not all(math.isfinite(v) for v in value):
            raise ValueError("must be 2 or 3 finite numbers (x y [z]) in pixels")
        return value

    @field_validator("fill", mode="after")
    @classmethod
    def _fill(cls, value: FillMode | None, info: ValidationInfo) -> FillMode | None:
        shape = info.data.get("shape")
        if value in ("value", "min", "max", "avg") and shape not in (None, *BINARY_SHAPES):
            raise ValueError(
                f"fill {value} applies to binary masks only; shape {shape} is soft and "
                "multiplies (fill soft_background blends towards the background mean)"
            )
        return value

    @field_validator("fill_value", mode="after")
    @classmethod
    def _fill_value(cls, value: float, info: ValidationInfo) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        shape = info.data.get("shape")
        soft = shape is not None and shape not in BINARY_SHAPES
        if value != 0 and soft and info.data.get("fill") is None:
            raise ValueError(f"applies to binary masks only, not to shape {shape}")
        return value

    @field_validator("gaussian_norm", mode="after")
    @classmethod
    def _gaussian_norm(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("shape", "gaussian") != "gaussian":
            raise ValueError("applies to shape gaussian only")
        return value

    @property
    def binary(self) -> bool:
        """Whether the mask is 0/1 (substitution fills) rather than soft (multiply)."""
        return self.shape in BINARY_SHAPES

    def resolved(self, shape: Sequence[int]) -> MaskGeometry:
        """The mask's geometry for images of ``shape``, every default replaced by its value.

        Parameters
        ----------
        shape
            ``(ny, nx)`` or ``(nz, ny, nx)`` in pixels.

        Raises
        ------
        ConfigError
            The settings do not fit 2D images (``cylinder``, a z centre or z size).
        """
        dims = tuple(int(n) for n in shape)
        if len(dims) not in (2, 3) or min(dims) < 1:
            raise ConfigError("shape", f"cannot build a mask for images of shape {dims}")
        if len(dims) == 2 and self.shape == "cylinder":
            raise ConfigError("shape", "cylinder is a 3D shape; use circular for 2D images")
        if len(dims) == 2 and len(self.center) == 3:
            raise ConfigError("center", "takes 2 values (x y) for 2D images")
        size = self.size or tuple(n // 2 for n in dims[::-1])
        if len(size) == 1:
            size = size * len(dims)
        if len(size) != len(dims):
            raise ConfigError("size", f"takes 1 or {len(dims)} values for images of {dims}")
        half = float(min(dims) // 2)
        if self.radius is not None:
            radius = self.radius
        else:
            radius = float(min(dims[-2:]) // 2) if self.shape == "cylinder" else half
        relion = self.convention == "relion"
        return MaskGeometry(
            shape=self.shape,
            dims=dims,
            center=tuple(self.center) + (0.0,) * (len(dims) - len(self.center)),
            relion=relion,
            invert=self.invert,
            radius=radius,
            inner=self.inner if self.inner is not None else 0.0,
            outer=self.outer if self.outer is not None else half,
            decay=self.decay if self.decay is not None else 0.0,
            sigma=self.sigma if self.sigma is not None else min(dims) / 6,
            height=self.height if self.height is not None else float(dims[0]),
            size=size,
            density=(self.gaussian_norm or ("peak" if relion else "density")) == "density",
        )


@dataclass(frozen=True)
class MaskGeometry:
    """A mask with every parameter explicit, for images of ``dims`` (see :class:`MaskSettings`).

    Parameters that the shape does not use hold their defaults and are ignored. ``center`` is
    ``(x, y[, z])``, ``size`` ``(x, y[, z])``; ``density`` selects Xmipp's normalised gaussian.
    """

    shape: ShapeName
    dims: tuple[int, ...]
    center: tuple[float, ...]
    relion: bool
    invert: bool
    radius: float
    inner: float
    outer: float
    decay: float
    sigma: float
    height: float
    size: tuple[int, ...]
    density: bool


def _raised_cosine(d: npt.NDArray[np.float64], r1: float, r2: float) -> npt.NDArray[np.float64]:
    """Xmipp's raised cosine: 1 for d ≤ r1, ½(1 + cos(π(d-r1)/(r2-r1))) between, 0 for d ≥ r2."""
    out = (d <= r1).astype(np.float64)
    if r2 > r1:
        edge = (d > r1) & (d < r2)
        out[edge] = 0.5 * (1.0 + np.cos(np.pi * (d[edge] - r1) / (r2 - r1)))
    return out


def _relion_crown(
    d: npt.NDArray[np.float64], inner: float, outer: float, width: float
) -> npt.NDArray[np.float64]:
    """RELION's ``raisedCrownMask``: soft edges of ``width`` outside ``[inner, outer)``."""
    inner_border, outer_border = inner - width, outer + width
    out = ((d >= inner) & (d < outer)).astype(np.float64)
    if width > 0:
        rising = (d >= inner_border) & (d < inner)
        out[rising] = 0.5 - 0.5 * np.cos(np.pi * (d[rising] - inner_border) / width)
        falling = (d >= outer) & (d < outer_border)
        out[falling] = 0.5 - 0.5 * np.cos(np.pi * (outer_border - d[falling]) / width)
    return out


def _logical_axes(dims: tuple[int, ...], center: tuple[float, ...]) -> list[npt.NDArray[Any]]:
    """Broadcastable offsets ``index - N//2 - c`` per axis, in array order (z, y, x)."""
    shifts = center[: len(dims)][::-1]
    axes = []
    for axis, (n, c) in enumerate(zip(dims, shifts, strict=True)):
        shape = [1] * len(dims)
        shape[axis] = n
        axes.append((np.arange(n, dtype=np.float64) - n // 2 - c).reshape(shape))
    return axes


def build_mask(shape: Sequence[int], settings: MaskSettings) -> FloatArray:
    """Build a mask (new, writable float32 array) for images of ``shape``.

    Parameters
    ----------
    shape
        ``(ny, nx)`` for particles or ``(nz, ny, nx)`` for volumes, in pixels.
    settings
        The mask; defaults are resolved for ``shape`` (:meth:`MaskSettings.resolved`).

    Returns
    -------
    numpy.ndarray
        float32 mask of ``shape``, computed in float64; 1 keeps a pixel.

    Raises
    ------
    ConfigError
        The settings do not fit the image dimensionality.
    """
    g = settings.resolved(shape)
    if g.shape in _RADIAL and all(float(c).is_integer() for c in g.center[: len(g.dims)]):
        return _radial_mask(g)
    axes = _logical_axes(g.dims, g.center)
    r2 = axes[0] ** 2
    for a in axes[1:]:
        r2 = r2 + a * a
    if g.shape in _RADIAL:
        return np.ascontiguousarray(_radial_profile(g, r2), dtype=np.float32)
    if g.shape == "box":
        keep = np.ones(g.dims, dtype=bool)
        for a, side in zip(axes, g.size[::-1], strict=True):
            low = -(side // 2)
            keep = keep & (a >= low) & (a <= low + side - 1)
    else:  # cylinder
        rxy2 = axes[1] ** 2 + axes[2] ** 2
        radial = np.sqrt(rxy2) < g.radius if g.relion else rxy2 <= g.radius**2
        keep = radial & (np.abs(axes[0]) <= g.height / 2)
    mask = keep.astype(np.float64)
    if g.invert:
        mask = 1.0 - mask
    return np.ascontiguousarray(mask, dtype=np.float32)


#: Shapes whose value depends only on the squared distance from the centre.
_RADIAL = frozenset({"circular", "crown", "gaussian", "raised_cosine", "raised_crown"})


def _radial_profile(g: MaskGeometry, r2: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The value of a radial mask at squared distances ``r2`` (any shape), in float64."""
    relion, invert = g.relion, g.invert
    mask: npt.NDArray[np.float64]
    if g.shape == "circular":
        if relion:
            mask = (np.sqrt(r2) < g.radius).astype(np.float64)
        else:
            # Xmipp's OUTSIDE circle is r² ≥ R², not the complement: the ring r = R is in both.
            mask = (r2 >= g.radius**2 if invert else r2 <= g.radius**2).astype(np.float64)
            invert = False
    elif g.shape == "crown":
        if relion:
            d = np.sqrt(r2)
            mask = ((d >= g.inner) & (d < g.outer)).astype(np.float64)
        else:
            mask = ((r2 >= g.inner**2) & (r2 <= g.outer**2)).astype(np.float64)
    elif g.shape == "gaussian":
        mask = np.exp(-r2 / (2.0 * g.sigma**2))
        if g.density:
            mask *= (math.sqrt(2.0 * math.pi) * g.sigma) ** (-len(g.dims))
    elif g.shape == "raised_cosine":
        mask = _raised_cosine(np.sqrt(r2), g.inner, g.outer)
    else:
        d, w = np.sqrt(r2), g.decay
        if relion:
            mask = _relion_crown(d, g.inner, g.outer, w)
        else:
            mask = _raised_cosine(d, g.outer - w, g.outer + w)
            mask *= 1.0 - _raised_cosine(d, g.inner - w, g.inner + w)
    if invert:
        mask = 1.0 - mask
    return mask


def _radial_mask(g: MaskGeometry) -> FloatArray:
    """A radial mask centred on whole pixels: squared distances are then integers, so the
    profile is computed once per distinct distance (about 3·(N/2)² values for an N³ volume,
    instead of N³) and gathered, with the same float64 values as the direct evaluation."""
    squares = [np.rint(a * a).astype(np.int64) for a in _logical_axes(g.dims, g.center)]
    top = sum(int(q.max()) for q in squares)
    index_type = np.int32 if top < 2**31 else np.int64
    r2 = np.zeros(g.dims, dtype=index_type)
    for q in squares:
        r2 += q.astype(index_type)
    profile = _radial_profile(g, np.arange(top + 1, dtype=np.float64)).astype(np.float32)
    return np.take(profile, r2)


def mask_2d(box: int | tuple[int, int], settings: MaskSettings) -> FloatArray:
    """A particle mask of ``box`` (side, or ``(ny, nx)``) pixels; see :func:`build_mask`."""
    dims = (box, box) if isinstance(box, int) else box
    return build_mask(dims, settings)


def mask_3d(shape: tuple[int, int, int], settings: MaskSettings) -> FloatArray:
    """A volume mask of ``(nz, ny, nx)`` voxels; see :func:`build_mask`."""
    return build_mask(shape, settings)

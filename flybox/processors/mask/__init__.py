"""2D and 3D masks (ALGORITHMS.md §12-13): shapes, fill rules, the chain step ``mask``."""

from flybox.processors.mask.shapes import (
    BINARY_SHAPES,
    SHAPE_ALIASES,
    SHAPE_PARAMETERS,
    Convention,
    FillMode,
    MaskGeometry,
    MaskSettings,
    ShapeName,
    build_mask,
    mask_2d,
    mask_3d,
)
from flybox.processors.mask.step import (
    MaskCache,
    MaskStep,
    MaskStepSettings,
    apply_mask,
    fill_rule,
    is_binary_mask,
)

__all__ = [
    "BINARY_SHAPES",
    "SHAPE_ALIASES",
    "SHAPE_PARAMETERS",
    "Convention",
    "FillMode",
    "MaskCache",
    "MaskGeometry",
    "MaskSettings",
    "MaskStep",
    "MaskStepSettings",
    "ShapeName",
    "apply_mask",
    "build_mask",
    "fill_rule",
    "is_binary_mask",
    "mask_2d",
    "mask_3d",
]

"""Micrograph images for the page: binned, filtered, contrast-stretched 8-bit PNG.

Pillow is not needed: a greyscale PNG is a zlib stream of rows behind three chunks. Filtering
is Gaussian in Fourier space on the binned image (a low-pass to see particles, an optional
high-pass to flatten ice gradients); the contrast maps mean ± ``contrast`` σ to black-white.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft

from flybox.pick.features import bin_image

__all__ = ["RenderSettings", "encode_png", "render_micrograph"]

#: Default width of the rendering in pixels (the page zooms it; 4k micrographs are binned 4).
DEFAULT_WIDTH = 1024


@dataclass(frozen=True)
class RenderSettings:
    """How to draw a micrograph.

    Attributes
    ----------
    binning
        Integer binning (0: automatic, the image at most :data:`DEFAULT_WIDTH` wide).
    lowpass
        σ of the Gaussian low-pass in micrograph pixels (0: none).
    highpass
        σ of the Gaussian removed as background in micrograph pixels (0: none).
    contrast
        Half-width of the grey range in standard deviations.
    """

    binning: int = 0
    lowpass: float = 0.0
    highpass: float = 0.0
    contrast: float = 3.0

    def binning_for(self, shape: tuple[int, ...]) -> int:
        if self.binning > 0:
            return self.binning
        return max(1, math.ceil(max(shape[0], shape[1]) / DEFAULT_WIDTH))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: npt.NDArray[np.uint8]) -> bytes:
    """An 8-bit greyscale ``(ny, nx)`` image as PNG bytes (filter 0, fast zlib level)."""
    ny, nx = image.shape
    rows = np.zeros((ny, nx + 1), dtype=np.uint8)
    rows[:, 1:] = image
    header = struct.pack(">IIBBBBB", nx, ny, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 1))
        + _chunk(b"IEND", b"")
    )


def render_micrograph(image: npt.NDArray[Any], settings: RenderSettings) -> tuple[bytes, int]:
    """Render a micrograph; returns the PNG bytes and the binning used."""
    factor = settings.binning_for(image.shape)
    binned = bin_image(image, factor).astype(np.float32, copy=False)
    if settings.lowpass > 0 or settings.highpass > 0:
        fy = np.fft.fftfreq(binned.shape[0])[:, None]
        fx = np.fft.rfftfreq(binned.shape[1])[None, :]
        f2 = fy * fy + fx * fx
        gain = np.ones_like(f2)
        if settings.lowpass > 0:
            sigma = settings.lowpass / factor
            gain *= np.exp(-2 * math.pi**2 * sigma**2 * f2)
        if settings.highpass > 0:
            sigma = settings.highpass / factor
            gain *= 1.0 - np.exp(-2 * math.pi**2 * sigma**2 * f2)
        spectrum = scipy.fft.rfft2(binned, workers=1) * gain.astype(np.float32)
        binned = scipy.fft.irfft2(spectrum, s=binned.shape, workers=1).astype(np.float32)
    sample = binned[::2, ::2]
    mean, std = float(sample.mean()), float(sample.std()) or 1.0
    low = mean - settings.contrast * std
    scale = 255.0 / (2 * settings.contrast * std)
    grey = np.clip((binned - low) * scale, 0, 255).astype(np.uint8)
    return encode_png(grey), factor

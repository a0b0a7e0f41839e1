"""Fourier cropping / rescaling of particle boxes, RELION's way (ALGORITHMS.md §8.1).

For a box of size N cropped to M (RELION ``--scale M``), in numpy terms::

    out = irfft2(crop(rfft2(x)), s=(M, M)) · (M/N)²

where ``crop`` keeps full-axis frequency rows ``0 … M//2`` and the last ``M − M//2 − 1``
negative rows, and half-axis columns ``0 … M//2``. For even M the output Nyquist row is the
input's **+M/2** row; the input's −M/2 row is dropped. The mean is preserved, the box centre
(index N//2) maps to index M//2, and the pixel size becomes ``p·N/M``. Upscaling (M > N) copies
the coefficients with ``kx² + ky² ≤ (N/2)²`` and leaves the rest zero.

:class:`FourierCropStep` fans one stream out into several named streams from **one** forward
FFT per particle (shared with a preceding box-level phase flip, see
:class:`~flybox.processors.base.ParticleStack`); a stream whose size equals the input box needs
no transform at all.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import numpy.typing as npt
from pydantic import Field, field_validator

from flybox.processors.base import (
    ParticleProcessor,
    ParticleStack,
    StepSettings,
    StreamSplitter,
    check_stream_name,
)
from flybox.processors.fft import cropped_rfft2, empty_aligned, irfftn_last, rfftn_last

__all__ = [
    "FourierCropSettings",
    "FourierCropStep",
    "WindowSettings",
    "WindowStep",
    "fourier_resize",
    "rescaled_box",
    "resize_spectrum",
    "window_images",
]


def resize_spectrum(
    spectrum: npt.NDArray[np.complex64], n: int, m: int
) -> npt.NDArray[np.complex64]:
    """Half spectra of ``n``-pixel boxes windowed to ``m`` pixels (RELION's coefficient map).

    Parameters
    ----------
    spectrum
        ``(..., n, n//2 + 1)`` half spectra (numpy scaling).
    n, m
        Input and output box sizes.

    Returns
    -------
    numpy.ndarray
        ``(..., m, m//2 + 1)`` half spectra; multiply the inverse transform by ``(m/n)²``.
    """
    lead = spectrum.shape[:-2]
    out = empty_aligned((*lead, m, m // 2 + 1), spectrum.dtype)
    out[...] = 0
    if m <= n:
        positive = m // 2 + 1
        negative = m - positive
        out[..., :positive, :] = spectrum[..., :positive, : m // 2 + 1]
        if negative:
            out[..., positive:, :] = spectrum[..., n - negative :, : m // 2 + 1]
        return out
    rows = np.arange(n)
    k_row = np.where(rows <= n // 2, rows, rows - n)
    k_col = np.arange(n // 2 + 1)
    inside = k_row[:, None] ** 2 + k_col[None, :] ** 2 <= (n / 2.0) ** 2
    out_rows = np.mod(k_row, m)
    src_r, src_c = np.nonzero(inside)
    out[..., out_rows[src_r], k_col[src_c]] = spectrum[..., src_r, src_c]
    return out


def fourier_resize(images: npt.NDArray[np.float32], m: int) -> npt.NDArray[np.float32]:
    """Resize ``(n_img, n, n)`` boxes to ``m`` pixels in Fourier space (RELION ``--scale``)."""
    n = images.shape[-1]
    if m == n:
        return np.array(images, dtype=np.float32, copy=True)
    spectrum = rfftn_last(np.asarray(images, dtype=np.float32))
    return _inverse_resized(spectrum, n, m)


def _inverse_resized(
    spectrum: npt.NDArray[np.complex64], n: int, m: int, *, pixel_ratio: float | None = None
) -> npt.NDArray[np.float32]:
    """Crop ``n``-size spectra to ``m`` and transform back, scaled by ``(m/N)²``, N being the
    real-space size the spectra came from (give ``pixel_ratio`` when that is not ``n``)."""
    resized = resize_spectrum(spectrum, n, m) if m != n else spectrum.copy()
    out = irfftn_last(resized, (m, m), overwrite_input=True).astype(np.float32, copy=False)
    out *= np.float32((m / n) ** 2 if pixel_ratio is None else pixel_ratio)
    return out


def rescaled_box(
    box: int,
    *,
    factor: float | None = None,
    target_pixel_size_a: float | None = None,
    pixel_size_a: float | None = None,
) -> int:
    """Output box for a rescale by ``factor`` or to a target pixel size, forced even.

    ``M = 2·round(box·factor/2)`` (RELION forces even sizes); with a target pixel size the
    factor is ``pixel_size_a / target_pixel_size_a``. The achieved pixel size is
    ``pixel_size_a·box/M``, written to ``rlnImagePixelSize``.
    """
    if (factor is None) == (target_pixel_size_a is None):
        raise ValueError("give exactly one of factor and target_pixel_size_a")
    if target_pixel_size_a is not None:
        if pixel_size_a is None or pixel_size_a <= 0 or target_pixel_size_a <= 0:
            raise ValueError("a target pixel size needs the micrograph pixel size")
        factor = pixel_size_a / target_pixel_size_a
    assert factor is not None
    if factor <= 0:
        raise ValueError(f"rescale factor must be positive, got {factor}")
    return max(2, 2 * int(np.floor(box * factor / 2.0 + 0.5)))


class FourierCropSettings(StepSettings):
    """Settings of ``fourier_crop``: output stream names and their box sizes in pixels."""

    outputs: dict[str, int] = Field(min_length=1)

    @field_validator("outputs")
    @classmethod
    def _valid_streams(cls, outputs: dict[str, int]) -> dict[str, int]:
        for name, size in outputs.items():
            check_stream_name(name)
            if size < 2:
                raise ValueError(f"stream {name}: size must be at least 2, got {size}")
        return outputs


class FourierCropStep(StreamSplitter[FourierCropSettings]):
    """Fan one stream out into named streams of other sizes (one forward FFT per particle)."""

    name: ClassVar[str] = "fourier_crop"
    Settings: ClassVar[type[StepSettings]] = FourierCropSettings

    def streams(self, extraction_box: int) -> dict[str, int]:
        """Output streams and their box sizes."""
        return dict(self.settings.outputs)

    def apply(self, stack: ParticleStack) -> dict[str, ParticleStack]:
        """One stack per configured output, resized from ``stack``."""
        n = stack.box
        out: dict[str, ParticleStack] = {}
        same_size_taken = False
        sizes = list(self.settings.outputs.values())
        crops = [m for m in sizes if m < n]
        # Crops only, and no spectrum yet (no Fourier step before this one): a pruned forward
        # transform for the largest crop serves every crop. Otherwise the full spectrum.
        pruned: tuple[int, npt.NDArray[np.complex64]] | None = None
        if crops and stack.spectrum is None and max(sizes) <= n:
            largest = max(crops)
            pruned = (largest, cropped_rfft2(stack.real(), largest))
        for stream, m in self.settings.outputs.items():
            pixel = stack.pixel_size_a * n / m
            if m == n:
                images = stack.real()
                if same_size_taken:
                    images = images.copy()
                same_size_taken = True
                out[stream] = stack.derive(stream=stream, box=m, pixel_size_a=pixel, images=images)
                continue
            if pruned is not None and m < n:
                resized = _inverse_resized(pruned[1], pruned[0], m, pixel_ratio=(m / n) ** 2)
            else:
                resized = _inverse_resized(stack.fourier(), n, m)
            out[stream] = stack.derive(stream=stream, box=m, pixel_size_a=pixel, images=resized)
        return out


def window_images(images: npt.NDArray[np.float32], size: int) -> npt.NDArray[np.float32]:
    """Real-space crop or zero-pad of ``(n, b, b)`` boxes to ``size`` around the centre.

    The centre pixel ``b//2`` lands on ``size//2`` (RELION ``--window``).
    """
    b = images.shape[-1]
    out = np.zeros((images.shape[0], size, size), dtype=np.float32)
    shift = size // 2 - b // 2
    src0 = max(0, -shift)
    dst0 = max(0, shift)
    length = min(b - src0, size - dst0)
    out[:, dst0 : dst0 + length, dst0 : dst0 + length] = images[
        :, src0 : src0 + length, src0 : src0 + length
    ]
    return out


class WindowSettings(StepSettings):
    """Settings of ``window``: the forced output box of a stream, in pixels of that stream."""

    size: int = Field(ge=2)
    streams: list[str] = Field(default_factory=lambda: ["particles"])


class WindowStep(ParticleProcessor[WindowSettings]):
    """Force a stream's output box by real-space crop/zero-pad around the centre."""

    name: ClassVar[str] = "window"
    Settings: ClassVar[type[StepSettings]] = WindowSettings

    def apply(self, stack: ParticleStack) -> ParticleStack:
        """Window the stack when its stream is listed; other streams pass unchanged."""
        if stack.stream not in self.settings.streams or stack.box == self.settings.size:
            return stack
        windowed = window_images(stack.real(), self.settings.size)
        return stack.derive(
            stream=stack.stream,
            box=self.settings.size,
            pixel_size_a=stack.pixel_size_a,
            images=windowed,
            sampled_box=stack.sampled_box,
        )

"""The last checks a worker makes before writing a stream's particles (pipeline/job.py)."""

from __future__ import annotations

import numpy as np
import pytest

from flybox.errors import MrcFormatError
from flybox.pipeline.chain import ChainSpec
from flybox.pipeline.job import MicrographJob, _check_finite
from flybox.types import ImageStats


def job(float16: bool = False) -> MicrographJob:
    return MicrographJob(
        micrograph="Micrographs/a.mrc",
        name="Micrographs/a.mrc",
        output_dir="out",
        chain=ChainSpec.of([{"step": "extract", "box": 8}]),
        float16=float16,
    )


def images(*values: float) -> np.ndarray:
    out = np.zeros((len(values), 4, 4), dtype=np.float32)
    for k, value in enumerate(values):
        out[k, 1, 2] = value
    return out


def stats_of(batch: np.ndarray) -> ImageStats:
    with np.errstate(invalid="ignore", over="ignore"):
        return ImageStats.of(batch)


@pytest.mark.parametrize("with_stats", [True, False])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_pixel_is_refused_with_or_without_the_steps_statistics(
    bad: float, with_stats: bool
) -> None:
    batch = images(1.0, bad, 2.0)
    with pytest.raises(MrcFormatError, match=r"a\.mrc.*particles: processing gave non-finite"):
        _check_finite(job(), "particles", batch, stats_of(batch) if with_stats else None)


@pytest.mark.parametrize("with_stats", [True, False])
def test_finite_particles_pass_and_float16_refuses_values_beyond_its_range(
    with_stats: bool,
) -> None:
    # The largest finite float32 squared still fits the float64 sums: finite particles are
    # never mistaken for non-finite ones.
    batch = images(3.0e38, -3.0e38, 1.0)
    stats = stats_of(batch) if with_stats else None
    _check_finite(job(), "particles", batch, stats)
    with pytest.raises(MrcFormatError, match="beyond float16's range"):
        _check_finite(job(float16=True), "particles", batch, stats)
    small = images(-65504.0, 65504.0)
    _check_finite(job(float16=True), "particles", small, stats_of(small) if with_stats else None)


def test_statistics_of_another_batch_are_not_trusted() -> None:
    # Statistics that do not describe these images (another count) are ignored: the pixels
    # themselves are checked.
    batch = images(1.0, np.nan)
    with pytest.raises(MrcFormatError, match="non-finite"):
        _check_finite(job(), "particles", batch, stats_of(images(1.0)))

"""Small synthetic micrographs for the picker's unit tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from flybox.io.mrc import write_micrograph
from flybox.pick.synthetic import SyntheticMicrograph, synthetic_micrograph

PARTICLE_SIZE = 48


@pytest.fixture(scope="session")
def synthetic_set() -> list[SyntheticMicrograph]:
    """Four 768² micrographs, 48-px particles among decoys at a low SNR."""
    return [
        synthetic_micrograph(
            768,
            PARTICLE_SIZE,
            particles=40,
            rings=8,
            disks=8,
            aggregates=4,
            ice=14,
            amplitude=0.5,
            seed=seed,
        )
        for seed in range(4)
    ]


@pytest.fixture
def micrograph_files(tmp_path: Path, synthetic_set: list[SyntheticMicrograph]) -> list[Path]:
    folder = tmp_path / "Micrographs"
    folder.mkdir()
    paths = []
    for i, mic in enumerate(synthetic_set[:3]):
        path = folder / f"mic{i}.mrc"
        write_micrograph(path, mic.image, 1.0)
        paths.append(path)
    return paths


def truth_picks(mic: SyntheticMicrograph, count: int | None = None) -> np.ndarray:
    return mic.particles[:count] if count else mic.particles

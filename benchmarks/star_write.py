"""Benchmark of STAR writing and reading: a RELION 3.1 particles file of 300 000 rows.

Run with ``.venv/bin/python benchmarks/star_write.py [--rows N] [--repeat K]``. Prints lines like::

    write  : flybox 1.10 s | starfile 3.50 s (3.2x) | per-cell printf 2.90 s (2.6x)
    copy   : flybox read+write 2.30 s | relion_star_handler 4.10 s (1.8x)

``write`` formats and writes the table (``data_optics`` + ``data_particles``, RELION's number
formats) with flybox's vectorised writer, with the ``starfile`` library and with Python's ``%``
formatting cell by cell (what a straightforward writer does). ``copy`` reads the file and
writes it again, flybox against RELION 3.1's ``relion_star_handler --i IN --o OUT`` (skipped
with a note when RELION is not installed). Times are the best of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import starfile

from flybox.io.star import _relion_float, read_relion_star, write_particles_star
from flybox.types import CTF_STAR_COLUMNS

sys.path.insert(0, str(Path(__file__).parent))
from mask import best_of

FLOAT_LABELS = [
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnAutopickFigureOfMerit",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    *CTF_STAR_COLUMNS,
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
    "rlnNormCorrection",
    "rlnLogLikeliContribution",
    "rlnMaxValueProbDistribution",
    "rlnAngleRotPrior",
    "rlnAngleTiltPrior",
]
INT_LABELS = ["rlnClassNumber", "rlnOpticsGroup", "rlnRandomSubset"]


def particles_table(rows: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An optics table and a particles table with ``rows`` rows of realistic magnitudes."""
    rng = np.random.default_rng(0)
    columns: dict[str, object] = {}
    for index, label in enumerate(FLOAT_LABELS):
        columns[label] = rng.normal(0, 10.0 ** (index % 5), rows)
    columns["rlnClassNumber"] = rng.integers(1, 50, rows)
    columns["rlnOpticsGroup"] = np.ones(rows, dtype=np.int64)
    columns["rlnRandomSubset"] = rng.integers(1, 3, rows)
    columns["rlnImageName"] = [
        f"{i % 1000 + 1:06d}@Particles/mic{i // 1000:05d}.mrcs" for i in range(rows)
    ]
    columns["rlnMicrographName"] = [f"Micrographs/mic{i // 1000:05d}.mrc" for i in range(rows)]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographOriginalPixelSize": [1.0],
            "rlnVoltage": [300.0],
            "rlnSphericalAberration": [2.7],
            "rlnAmplitudeContrast": [0.1],
            "rlnImagePixelSize": [1.0],
            "rlnImageSize": [256],
            "rlnImageDimensionality": [2],
        }
    )
    return optics, pd.DataFrame(columns)


def per_cell_write(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """The straightforward writer: every cell through ``%`` formatting."""

    def block(name: str, table: pd.DataFrame) -> list[str]:
        lines = ["", "# version 30001", "", f"data_{name}", "", "loop_"]
        lines += [f"_{label} #{i + 1}" for i, label in enumerate(table.columns)]
        formatters: list[Callable[[Any], str]] = []
        for label in table.columns:
            kind = table[label].dtype.kind
            if kind == "f":
                formatters.append(_relion_float)
            elif kind in "iu":
                formatters.append(lambda v: "%12d" % v)  # noqa: UP031
            else:
                formatters.append(str)
        for row in table.itertuples(index=False):
            lines.append(" ".join(f(v) for f, v in zip(formatters, row, strict=True)))
        return lines

    text = "\n".join(block("optics", optics) + block("particles", particles)) + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000, help="particles (default 300000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, best taken (default 3)")
    args = parser.parse_args()

    optics, particles = particles_table(args.rows)
    with tempfile.TemporaryDirectory(prefix="flybox-star-bench-") as folder:
        work = Path(folder)
        source = work / "particles.star"
        write_particles_star(source, optics, particles)
        size_mb = source.stat().st_size / 1e6
        print(f"table  : {args.rows} particles x {particles.shape[1]} columns, {size_mb:.0f} MB")

        flybox_write = best_of(
            args.repeat, lambda: write_particles_star(work / "f.star", optics, particles)
        )
        library = best_of(
            args.repeat,
            lambda: starfile.write(
                {"optics": optics, "particles": particles}, work / "s.star", overwrite=True
            ),
        )
        cells = best_of(args.repeat, lambda: per_cell_write(work / "c.star", optics, particles))
        print(
            f"write  : flybox {flybox_write:.2f} s | starfile {library:.2f} s "
            f"({library / flybox_write:.1f}x) | per-cell printf {cells:.2f} s "
            f"({cells / flybox_write:.1f}x)"
        )

        def flybox_copy() -> None:
            table = read_relion_star(source, "particles")
            assert table.optics is not None
            write_particles_star(work / "copy.star", table.optics, table.rows)

        flybox_time = best_of(args.repeat, flybox_copy)
        relion = shutil.which("relion_star_handler")
        if relion is None:
            print(f"copy   : flybox read+write {flybox_time:.2f} s | RELION not installed")
            return
        command = [relion, "--i", str(source), "--o", str(work / "relion.star")]
        relion_time = best_of(
            args.repeat,
            lambda: subprocess.run(command, check=True, capture_output=True),
        )
        back = read_relion_star(work / "relion.star", "particles").rows
        assert len(back) == args.rows, "relion_star_handler lost rows"
        print(
            f"copy   : flybox read+write {flybox_time:.2f} s | relion_star_handler "
            f"{relion_time:.2f} s ({relion_time / flybox_time:.1f}x)"
        )


if __name__ == "__main__":
    main()

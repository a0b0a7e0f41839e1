"""Fuzzing the input readers (issue 9): generated MRC headers and coordinate files, each one
read or rejected with an :class:`~flybox.errors.InputError` (no other exception), with
bounded memory (tracemalloc peak) and bounded work (each input is small; a hang is caught by
a generous alarm, which is a hang detector, not a timing assertion).

Seeded (``numpy.random.default_rng``), so a failure reproduces with the printed case number.
"""

from __future__ import annotations

import signal
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import numpy as np
import pytest

from flybox.errors import InputError
from flybox.io.coords import read_coordinates
from flybox.io.mrc import check_complete, read_header, read_micrograph

CASES = 1000
#: Peak Python/numpy allocation allowed for reading one small input.
MEMORY_BYTES = 64 << 20
#: A read that has not returned after this long is hung (far above any honest read here).
HANG_SECONDS = 20


class HungError(Exception):
    pass


@contextmanager
def hang_guard() -> Iterator[None]:
    def _alarm(number: int, frame: FrameType | None) -> None:
        raise HungError("the reader did not return")

    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _attempt(case: int, path: Path, read: Callable[[Path], object]) -> str:
    tracemalloc.start()
    try:
        with hang_guard():
            read(path)
        outcome = "read"
    except InputError:
        outcome = "rejected"
    except Exception as exc:  # pragma: no cover - what the test exists to catch
        raise AssertionError(
            f"case {case}: {path.name}: {type(exc).__name__}: {exc}\n{path.read_bytes()[:300]!r}"
        ) from exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < MEMORY_BYTES, f"case {case}: {peak} bytes to read {path.stat().st_size}"
    return outcome


# ----------------------------------------------------------------------------- MRC
def _mrc_header(rng: np.random.Generator) -> bytes:
    """A 1024-byte header: a valid one with some fields replaced by hostile values."""
    nx, ny, nz = (int(v) for v in rng.integers(1, 64, 3))
    mode = int(rng.choice([0, 1, 2, 6, 12, 3, 4, 5, 7, 101, -1, 2**31 - 1]))
    fields = {
        "nx": nx,
        "ny": ny,
        "nz": nz,
        "mode": mode,
        "nsymbt": 0,
    }
    hostile = [0, -1, 1, 2**31 - 1, -(2**31), 65536, 1 << 20]
    for name in fields:
        if rng.random() < 0.3:
            fields[name] = int(rng.choice(hostile))
    header = bytearray(rng.integers(0, 256, 1024, dtype=np.uint8).tobytes())
    if rng.random() < 0.2:
        return bytes(header)  # pure noise
    order = "<" if rng.random() < 0.8 else ">"
    struct.pack_into(
        f"{order}4i", header, 0, fields["nx"], fields["ny"], fields["nz"], fields["mode"]
    )
    struct.pack_into(f"{order}i", header, 92, fields["nsymbt"])
    struct.pack_into(f"{order}3f", header, 40, *(float(v) for v in rng.normal(50, 100, 3)))
    header[208:212] = (
        b"MAP " if rng.random() < 0.9 else bytes(rng.integers(0, 256, 4, dtype=np.uint8))
    )
    header[212:216] = b"\x44\x44\x00\x00" if order == "<" else b"\x11\x11\x00\x00"
    return bytes(header)


def _mrc_file(rng: np.random.Generator) -> bytes:
    header = _mrc_header(rng)
    shape = struct.unpack_from("<3i", header, 0)
    plausible = all(0 < v < 64 for v in shape)
    size = int(np.prod(shape)) * 4 if plausible else int(rng.integers(0, 4096))
    roll = rng.random()
    if roll < 0.2:
        size = max(0, size - int(rng.integers(1, 64)))
    elif roll < 0.3:
        size += int(rng.integers(1, 64))
    cut = int(rng.integers(0, 1024)) if rng.random() < 0.1 else 1024
    body = rng.standard_normal(size // 4 + 1).astype(np.float32).tobytes()[:size]
    return header[:cut] + (body if cut == 1024 else b"")


def test_fuzz_mrc_headers(tmp_path: Path) -> None:
    rng = np.random.default_rng(20240909)
    outcomes = {"read": 0, "rejected": 0}
    for case in range(CASES):
        path = tmp_path / f"case{case % 8}.mrc"
        path.write_bytes(_mrc_file(rng))
        outcomes[_attempt(case, path, read_header)] += 1
        check_complete(path)  # never raises: reports what is wrong
        _attempt(case, path, lambda p: read_micrograph(p, mmap=False))
    assert outcomes["read"] > 0
    assert outcomes["rejected"] > 0


# ----------------------------------------------------------------------------- coordinates
_SUFFIXES = [".star", ".box", ".cbox", ".pos", ".txt", ".cs", ".coords"]
_TOKENS = [
    "1",
    "-3.5",
    "1e308",
    "1e999",
    "nan",
    "inf",
    "-inf",
    "x",
    "",
    "#",
    "data_",
    "data_cryolo",
    "data_particles",
    "loop_",
    "_rlnCoordinateX",
    "_rlnCoordinateY",
    "_rlnCoordinateX #1",
    "_rlnAutopickFigureOfMerit",
    "_CoordinateX",
    "_CoordinateY",
    "_Width",
    "_xcoor",
    "_ycoor",
    "image_name",
    "x_coord",
    "y_coord",
    "\t",
    ",",
    '"',
    "'",
    "\x00",
    "\xff",
    "é",
]


def _coordinate_text(rng: np.random.Generator) -> bytes:
    kind = rng.random()
    if kind < 0.15:  # binary garbage
        return rng.integers(0, 256, int(rng.integers(0, 2048)), dtype=np.uint8).tobytes()
    lines = []
    if kind < 0.6:  # STAR-like
        block = str(rng.choice(["data_", "data_cryolo", "data_particles", "data_coordinates"]))
        lines += [block, "", "loop_"]
        labels = [
            str(
                rng.choice(
                    [
                        "_rlnCoordinateX",
                        "_rlnCoordinateY",
                        "_rlnAutopickFigureOfMerit",
                        "_CoordinateX",
                        "_CoordinateY",
                        "_Width",
                        "_Height",
                        "_xcoor",
                        "_ycoor",
                        "_rlnCtfImage",
                        "_Confidence",
                    ]
                )
            )
            for _ in range(int(rng.integers(0, 6)))
        ]
        lines += [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    width = (len(lines) and max(len(lines) - 3, 1)) or int(rng.integers(2, 6))
    hostile = float(rng.choice([0.0, 0.01, 0.2]))  # many files clean: the parsers go deep
    for _ in range(int(rng.integers(0, 40))):
        if rng.random() < hostile:
            width = int(rng.integers(0, 8))
        tokens = [
            str(rng.choice(_TOKENS)) if rng.random() < hostile else f"{rng.normal(500, 300):.2f}"
            for _ in range(width)
        ]
        sep = str(rng.choice([" ", "\t", ",", "  "])) if hostile else " "
        lines.append(sep.join(tokens))
    if rng.random() < 0.05:  # one very long line (bounded: refused before parsing)
        lines.append(" ".join(["1.0"] * int(rng.integers(20_000, 40_000))))
    return "\n".join(lines).encode("utf-8", "surrogateescape")


def _cs_bytes(rng: np.random.Generator) -> bytes:
    if rng.random() < 0.5:
        return rng.integers(0, 256, int(rng.integers(0, 512)), dtype=np.uint8).tobytes()
    header = b"\x93NUMPY\x01\x00"
    body = rng.integers(0, 256, int(rng.integers(0, 256)), dtype=np.uint8).tobytes()
    return header + body


def test_fuzz_coordinate_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    outcomes = {"read": 0, "rejected": 0}
    for case in range(CASES):
        suffix = _SUFFIXES[case % len(_SUFFIXES)]
        path = tmp_path / f"case{case % 16}{suffix}"
        path.write_bytes(_cs_bytes(rng) if suffix == ".cs" else _coordinate_text(rng))
        outcomes[_attempt(case, path, read_coordinates)] += 1
    assert outcomes["read"] > 0
    assert outcomes["rejected"] > 0


@pytest.mark.parametrize("suffix", [".cbox", ".pos"])
def test_binary_garbage_is_not_zero_picks(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(np.random.default_rng(1).integers(1, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(InputError):
        read_coordinates(path)


def test_duplicated_star_column_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "dup_autopick.star"
    path.write_text(
        "data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
        "10 11 12\n20 21 22\n"
    )
    with pytest.raises(InputError, match="appears twice"):
        read_coordinates(path)


def test_one_huge_row_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "wide_autopick.star"
    row = " ".join(["1.0"] * 200_000)
    path.write_text(f"data_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n{row}\n")
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="longer than"):
            read_coordinates(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * path.stat().st_size

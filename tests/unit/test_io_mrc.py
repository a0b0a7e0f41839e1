"""MRC reading and writing, checked against mrcfile on real and synthetic files."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import mrcfile
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from flybox.errors import IncompleteFileError, MrcFormatError
from flybox.io import mrc
from flybox.io.mrc import (
    HEADER_BYTES,
    StackWriter,
    check_complete,
    read_header,
    read_micrograph,
    read_stack,
    read_volume,
    relion_float16,
    write_micrograph,
    write_stack,
    write_volume,
)

REAL_MRC = [
    "ASPIRE-Python/gallery/tutorials/data/clean70SRibosome_vol_65p.mrc",
    "ASPIRE-Python/tests/saved_test_data/rln_proj_64.mrcs",
    "ASPIRE-Python/tests/saved_test_data/rln_proj_65.mrcs",
    "ASPIRE-Python/tests/saved_test_data/sample.mrcs",
    "cryodrgn/tests/data/ay19102021_L3_position6_ribo_it09_bin8_1.82A.mrcs",
    "cryodrgn/tests/data/empiar_10076_7.mrc",
    "cryodrgn/tests/data/relion31.mrcs",
    "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/masks/Ucsf_stack_1142_DW.mrc",
    "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/mics/Ucsf_stack_1142_DW.mrc",
    "mrcfile/tests/test_data/EMD-3001.map",
    "mrcfile/tests/test_data/EMD-3197.map",
    "mrcfile/tests/test_data/epu2.9_example.mrc",
    "mrcfile/tests/test_data/fei-extended.mrc",
    "peer-outputs/aspire-0.14.3_extract/out_0_38.mrcs",
    "peer-outputs/cryodrgn-4.3.1_downsample/cryodrgn_ds32.mrcs",
    "peer-outputs/cryodrgn-4.3.1_downsample/empiar_10076_7_ds64.mrcs",
    "peer-outputs/cryodrgn-4.3.1_downsample/raw_cryodrgn_ds32.mrcs",
    "peer-outputs/relion-3.1.3_extract/Extract/Micrographs/Ucsf_stack_1142_DW.mrcs",
    "peer-outputs/relion-3.1.3_extract/ExtractRaw/Micrographs/Ucsf_stack_1142_DW.mrcs",
    "peer-outputs/relion-3.1.3_extract/ExtractScale/Micrographs/Ucsf_stack_1142_DW.mrcs",
    "peer-outputs/relion-3.1.3_mask_create/EMD-3197_mask_relion.mrc",
    "peer-outputs/relion-3.1.3_mask_create/mask_relion.mrc",
]
UCSF = "micrograph_cleaner_em/micrograph_cleaner_em/tests/data/mics/Ucsf_stack_1142_DW.mrc"


def mrcfile_read(path: Path) -> tuple[npt.NDArray[Any], Any, Any]:
    """Data, voxel size and header as mrcfile sees them (permissive: some real files are old)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.open(path, permissive=True) as mrc:
            return np.array(mrc.data), mrc.voxel_size.copy(), mrc.header.copy()


def as_floats(voxel: Any) -> tuple[float, float, float]:
    return (float(voxel.x), float(voxel.y), float(voxel.z))


def make_mrc(path: Path, data: npt.NDArray[Any], voxel: float = 1.5) -> Path:
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel
    return path


@pytest.mark.parametrize("relpath", REAL_MRC)
def test_real_file_reads_like_mrcfile(real_data: Path, relpath: str) -> None:
    path = real_data / relpath
    data, info = read_stack(path)
    ref, voxel, header = mrcfile_read(path)
    assert check_complete(path).complete
    assert data.shape == info.shape == ref.reshape(info.shape).shape
    assert data.dtype == ref.dtype.newbyteorder("=")
    np.testing.assert_array_equal(data, ref.reshape(info.shape))
    assert info.voxel_size_a == pytest.approx(as_floats(voxel), rel=1e-6)
    assert info.mode == int(header.mode)
    assert info.ispg == int(header.ispg)
    assert info.nsymbt == int(header.nsymbt)
    assert info.exttyp == bytes(header.exttyp).decode().strip("\0 ")
    assert info.expected_size == path.stat().st_size


def test_ucsf_micrograph_is_non_square_memory_map_with_unset_pixel_size(real_data: Path) -> None:
    image, info = read_micrograph(real_data / UCSF)
    assert image.shape == (927, 959)
    assert image.dtype == np.float32
    assert not image.flags.writeable
    assert info.pixel_size_a == 1.0
    assert float(image.mean()) == pytest.approx(6802, rel=1e-3)


def test_epu_mode6_fei2_extended_header_is_skipped(real_data: Path) -> None:
    path = real_data / "mrcfile/tests/test_data/epu2.9_example.mrc"
    image, info = read_micrograph(path, mmap=False)
    assert (info.mode, info.exttyp, info.nsymbt) == (6, "FEI2", 909312)
    assert info.data_offset == HEADER_BYTES + 909312
    assert image.shape == (4096, 4096)
    assert image.dtype == np.uint16
    assert info.pixel_size_a == pytest.approx(0.6666, abs=1e-3)
    np.testing.assert_array_equal(image, mrcfile_read(path)[0])


def test_fei1_non_square_mode6(real_data: Path) -> None:
    path = real_data / "mrcfile/tests/test_data/fei-extended.mrc"
    image, info = read_micrograph(path)
    assert (info.nx, info.ny, info.exttyp, info.nsymbt) == (3710, 3838, "FEI1", 786432)
    assert image.shape == (3838, 3710)
    assert info.pixel_size_a == pytest.approx(0.8538, abs=1e-4)
    assert float(image.mean()) == pytest.approx(3521, rel=1e-3)


def test_emd3001_anisotropic_non_cubic_volume_with_symmetry_records(real_data: Path) -> None:
    volume, info = read_volume(real_data / "mrcfile/tests/test_data/EMD-3001.map")
    assert volume.shape == (25, 43, 73)
    assert volume.flags.writeable
    assert info.ispg == 4
    assert info.nsymbt == 160
    assert info.grid == (40, 12, 72)
    assert info.axis_order == (3, 1, 2)
    assert info.voxel_size_a == pytest.approx((17.93 / 40, 4.71 / 12, 33.03 / 72), rel=1e-6)


def test_ribosome_voxel_size_zero_means_unset(real_data: Path) -> None:
    volume, info = read_volume(
        real_data / "ASPIRE-Python/gallery/tutorials/data/clean70SRibosome_vol_65p.mrc"
    )
    assert volume.shape == (65, 65, 65)
    assert info.voxel_size_a == (0.0, 0.0, 0.0)
    assert info.pixel_size_a is None


def test_stack_with_volume_header_reads_as_stack_but_not_as_micrograph(real_data: Path) -> None:
    path = real_data / "cryodrgn/tests/data/empiar_10076_7.mrc"
    stack, info = read_stack(path)
    assert stack.shape == (7, 320, 320)
    assert info.ispg == 1
    with pytest.raises(MrcFormatError, match="7 sections"):
        read_micrograph(path)


def test_old_file_without_map_id_is_accepted(real_data: Path) -> None:
    info = read_header(real_data / "cryodrgn/tests/data/relion31.mrcs")
    assert info.raw_header[208:212] == b"\0\0\0\0"
    assert info.shape == (5, 256, 256)
    assert info.byte_order == "<"


def test_single_image_reads_as_stack_of_one(real_data: Path) -> None:
    stack, _ = read_stack(real_data / UCSF)
    assert stack.shape == (1, 927, 959)


@pytest.mark.parametrize(
    ("dtype", "mode"),
    [(np.int8, 0), (np.int16, 1), (np.float32, 2), (np.uint16, 6), (np.float16, 12)],
)
@pytest.mark.parametrize("shape", [(7, 5), (3, 9, 4), (1, 13, 13)])
def test_synthetic_modes_and_odd_shapes(
    tmp_path: Path, dtype: type[np.generic], mode: int, shape: tuple[int, ...]
) -> None:
    data = (np.arange(np.prod(shape)) % 100).astype(dtype).reshape(shape)
    path = make_mrc(tmp_path / "x.mrc", data, voxel=2.5)
    stack, info = read_stack(path, mmap=False)
    assert info.mode == mode
    assert stack.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(stack, data.reshape(info.shape))
    assert info.pixel_size_a == pytest.approx(2.5)


def test_big_endian_file_reads_native(tmp_path: Path) -> None:
    data = np.arange(12, dtype=">f4").reshape(3, 4)
    path = make_mrc(tmp_path / "be.mrc", data, voxel=2.0)
    for mmap in (True, False):
        image, info = read_micrograph(path, mmap=mmap)
        assert info.byte_order == ">"
        assert image.dtype.isnative
        np.testing.assert_array_equal(image, data)
    assert read_header(path).pixel_size_a == 2.0


def test_truncated_mrc_is_incomplete_not_readable(tmp_path: Path) -> None:
    path = make_mrc(tmp_path / "t.mrc", np.ones((20, 30), np.float32))
    full = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(full - 100)
    status = check_complete(path)
    assert not status.complete
    assert (status.expected_bytes, status.actual_bytes) == (full, full - 100)
    assert status.info is not None
    assert status.problem == f"truncated: {full - 100} of {full} bytes"
    with pytest.raises(IncompleteFileError, match=r"t\.mrc: truncated"):
        read_micrograph(path)


def test_truncated_real_micrograph(real_data: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial.mrc"
    partial.write_bytes((real_data / UCSF).read_bytes()[:500_000])
    assert not check_complete(partial).complete
    with pytest.raises(IncompleteFileError):
        read_micrograph(partial)


def test_file_larger_than_header_says_is_corrupt(tmp_path: Path) -> None:
    path = make_mrc(tmp_path / "big.mrc", np.ones((4, 4), np.float32))
    with open(path, "ab") as fh:
        fh.write(b"\0" * 12)
    status = check_complete(path)
    assert not status.complete
    assert status.problem == "file is 12 bytes larger than its header says"
    with pytest.raises(MrcFormatError, match="12 bytes larger"):
        read_stack(path)


def test_short_file_is_incomplete(tmp_path: Path) -> None:
    path = tmp_path / "short.mrc"
    path.write_bytes(b"\1" * 100)
    with pytest.raises(IncompleteFileError, match="only 100 bytes"):
        read_header(path)
    status = check_complete(path)
    assert (status.complete, status.info, status.actual_bytes) == (False, None, 100)
    assert status.problem is not None


def test_garbage_bytes_are_rejected_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mrc"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MrcFormatError) as excinfo:
        read_header(path)
    assert str(excinfo.value).startswith(str(path))
    status = check_complete(path)
    assert not status.complete
    assert status.problem == excinfo.value.problem


def test_missing_file_check_does_not_raise(tmp_path: Path) -> None:
    status = check_complete(tmp_path / "nope.mrc")
    assert not status.complete
    assert status.problem is not None
    assert "cannot read" in status.problem


def _with_header_word(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(np.int32(value).tobytes())


@pytest.mark.parametrize(
    ("mode", "message"),
    [(4, "unsupported MRC mode 4 (complex)"), (3, "unsupported MRC mode 3"), (101, "4-bit")],
)
def test_unsupported_mode_is_named(tmp_path: Path, mode: int, message: str) -> None:
    path = make_mrc(tmp_path / "m.mrc", np.ones((4, 4), np.float32))
    _with_header_word(path, 12, mode)
    with pytest.raises(MrcFormatError, match=re.escape(message)) as excinfo:
        read_header(path)
    assert str(excinfo.value) == f"{path}: {excinfo.value.problem}"


def test_non_positive_dimensions_are_rejected(tmp_path: Path) -> None:
    path = make_mrc(tmp_path / "d.mrc", np.ones((4, 4), np.float32))
    _with_header_word(path, 4, 0)
    with pytest.raises(MrcFormatError, match="non-positive dimensions"):
        read_header(path)


def test_bad_map_id_is_rejected(tmp_path: Path) -> None:
    path = make_mrc(tmp_path / "id.mrc", np.ones((4, 4), np.float32))
    with open(path, "r+b") as fh:
        fh.seek(208)
        fh.write(b"XYZ!")
    with pytest.raises(MrcFormatError, match="bad MAP id"):
        read_header(path)


# --- RELION float16 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1.0, 1.0),
        (1 + 2**-11, 1 + 2**-10),  # exact tie: away from zero (numpy: to even → 1.0)
        (-(1 + 2**-11), -(1 + 2**-10)),
        (1 + 3 * 2**-11, 1 + 2 * 2**-10),  # tie whose even neighbour is also the away one
        (1 + 2**-11 - 2**-20, 1.0),  # just below the tie
        (2 - 2**-12, 2.0),  # mantissa carry into the exponent
        (65504.0, 65504.0),
        (65519.0, 65504.0),
        (65520.0, 65504.0),  # numpy: inf
        (1e6, 65504.0),
        (-1e6, -65504.0),
        (2.0**-14, 2.0**-14),  # smallest normal half
        (2.0**-15, 0.0),  # subnormal range flushes
        (2.0**-14 - 2.0**-26, 2.0**-14),  # rounds up to the smallest normal first
        (1e-40, 0.0),  # float32 subnormal
        (np.inf, np.inf),
        (-np.inf, -np.inf),
    ],
)
def test_relion_float16_hand_computed(value: float, expected: float) -> None:
    result = relion_float16(np.array([value], dtype=np.float32))
    assert result.dtype == np.float16
    assert float(result[0]) == expected
    assert np.signbit(result[0]) == np.signbit(np.float32(value))


def test_relion_float16_signed_zero_and_nan() -> None:
    result = relion_float16(np.array([-0.0, -(2.0**-16), np.nan], dtype=np.float32))
    np.testing.assert_array_equal(result[:2], [0.0, 0.0])
    assert np.signbit(result[:2]).all()
    assert np.isnan(result[2])
    assert relion_float16(np.zeros((2, 3, 4), np.float32)).shape == (2, 3, 4)


@given(
    hnp.arrays(
        np.float32,
        st.integers(1, 200),
        elements=st.floats(-70000, 70000, width=32, allow_nan=False),
    )
)
def test_relion_float16_property(values: npt.NDArray[np.float32]) -> None:
    result = relion_float16(values)
    magnitude = np.abs(values.astype(np.float64))
    normal = (magnitude >= 2.0**-14) & (magnitude <= 65504)
    ulp = 2.0 ** (np.floor(np.log2(np.where(normal, magnitude, 1.0))) - 10)
    error = np.abs(result.astype(np.float64) - values.astype(np.float64))
    assert np.all(error[normal] <= ulp[normal] / 2)
    with np.errstate(over="ignore"):
        numpy_half = values.astype(np.float16)
    scaled = values.astype(np.float64) / ulp * 2  # odd integer ⇔ exact tie
    tie = normal & (np.mod(scaled, 2) == 1)
    same = normal & ~tie & (magnitude < 65504)
    np.testing.assert_array_equal(result[same], numpy_half[same])
    assert np.all(np.abs(result.astype(np.float64)) <= 65504)
    assert np.all(result[magnitude < 2.0**-15] == 0)


# --- writers --------------------------------------------------------------------------------


def test_stack_writer_header_matches_mrcfile(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.normal(3.0, 2.0, (k, 24, 24)).astype(np.float32) for k in (3, 1, 5)]
    path = tmp_path / ".p.mrcs.tmp"
    with StackWriter(path, 24, 1.25) as writer:
        for chunk in chunks:
            writer.append(chunk)
        writer.append(np.empty((0, 24, 24), np.float32))
        assert writer.count == 9
    data, voxel, header = mrcfile_read(path)
    everything = np.concatenate(chunks)
    np.testing.assert_array_equal(data, everything)
    assert (int(header.mode), int(header.nz), int(header.mz), int(header.ispg)) == (2, 9, 1, 0)
    assert as_floats(voxel) == pytest.approx((1.25, 1.25, 1.25))
    assert bytes(header.map) == b"MAP "
    assert int(header.nversion) == 20140
    as64 = everything.astype(np.float64)
    assert float(header.dmin) == pytest.approx(as64.min())
    assert float(header.dmax) == pytest.approx(as64.max())
    assert float(header.dmean) == pytest.approx(as64.mean(axis=(1, 2)).mean(), rel=1e-6)
    assert float(header.rms) == pytest.approx(np.sqrt(as64.var(axis=(1, 2)).mean()), rel=1e-6)
    assert mrcfile.validate(str(path), print_file=io.StringIO())


def test_stack_writer_float16_and_unknown_pixel_size(tmp_path: Path) -> None:
    images = np.linspace(-3, 3, 2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10)
    path = tmp_path / "half.mrcs"
    with StackWriter(path, 10, None, float16=True) as writer:
        writer.append(images[0])
        writer.append(images[1:])
    stack, info = read_stack(path)
    assert info.mode == 12
    assert stack.dtype == np.float16
    np.testing.assert_array_equal(stack, relion_float16(images))
    assert info.cell_a == (10.0, 10.0, 1.0)
    assert info.pixel_size_a == 1.0
    assert info.stats[0] == float(relion_float16(images).min())


def test_stack_writer_exception_removes_file(tmp_path: Path) -> None:
    path = tmp_path / "fail.mrcs"

    def write_then_die() -> None:
        with StackWriter(path, 8, 1.0) as writer:
            writer.append(np.zeros((2, 8, 8), np.float32))
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        write_then_die()
    assert not path.exists()


def test_stack_writer_rejects_empty_stack_and_wrong_shape(tmp_path: Path) -> None:
    path = tmp_path / "empty.mrcs"
    writer = StackWriter(path, 8, 1.0)
    with pytest.raises(ValueError, match=r"\(k, 8, 8\)"):
        writer.append(np.zeros((1, 8, 9), np.float32))
    with pytest.raises(ValueError, match="no images"):
        writer.close()
    assert not path.exists()
    writer.close()  # idempotent after the failure


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(1, 4),
    box=st.integers(1, 17),
    float16=st.booleans(),
    pixel=st.one_of(st.none(), st.floats(0.1, 10)),
    seed=st.integers(0, 2**32 - 1),
)
def test_write_stack_round_trip(
    tmp_path: Path, n: int, box: int, float16: bool, pixel: float | None, seed: int
) -> None:
    images = np.random.default_rng(seed).normal(0, 100, (n, box, box)).astype(np.float32)
    path = tmp_path / "round.mrcs"
    write_stack(path, images, pixel, float16=float16)
    stack, info = read_stack(path)
    expected = relion_float16(images) if float16 else images
    np.testing.assert_array_equal(stack, expected)
    assert info.shape == (n, box, box)
    assert info.pixel_size_a == pytest.approx(pixel if pixel else 1.0, rel=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["round.mrcs"]


def test_write_volume_keeps_template_metadata(real_data: Path, tmp_path: Path) -> None:
    source = real_data / "mrcfile/tests/test_data/EMD-3001.map"
    volume, info = read_volume(source)
    masked = volume * 0.5
    out = tmp_path / "masked.mrc"
    write_volume(out, masked, voxel_size_a=None, template=info)
    back, new = read_volume(out)
    np.testing.assert_array_equal(back, masked)
    for name in ("origin_a", "nstart", "grid", "cell_a", "ispg", "axis_order", "labels", "nsymbt"):
        assert getattr(new, name) == getattr(info, name), name
    assert out.read_bytes()[1024:1184] == source.read_bytes()[1024:1184]
    assert new.stats[1] == pytest.approx(float(masked.max()))
    assert new.stats[3] == pytest.approx(float(masked.astype(np.float64).std()), rel=1e-6)
    _, voxel, _ = mrcfile_read(out)
    assert as_floats(voxel) == pytest.approx(info.voxel_size_a, rel=1e-6)


def test_write_volume_template_path_and_override_voxel(real_data: Path, tmp_path: Path) -> None:
    source = real_data / "mrcfile/tests/test_data/EMD-3197.map"
    volume, _ = read_volume(source)
    out = tmp_path / "v.mrc"
    write_volume(out, volume, voxel_size_a=5.0, template=source)
    info = read_header(out)
    assert info.voxel_size_a == (5.0, 5.0, 5.0)
    assert info.nstart == read_header(source).nstart


def test_write_volume_without_template(tmp_path: Path) -> None:
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = tmp_path / "plain.mrc"
    write_volume(out, volume, voxel_size_a=(1.0, 2.0, 3.0))
    _, voxel, header = mrcfile_read(out)
    assert as_floats(voxel) == (1.0, 2.0, 3.0)
    assert int(header.ispg) == 1
    write_volume(out, volume, voxel_size_a=None)
    assert read_header(out).pixel_size_a is None
    np.testing.assert_array_equal(read_volume(out)[0], volume)


def test_writers_are_still_importable_from_the_reading_module() -> None:
    assert mrc.StackWriter is StackWriter
    assert mrc.write_stack is write_stack
    with pytest.raises(AttributeError):
        _ = mrc.no_such_writer


def test_write_micrograph_round_trip_non_square_with_pixel_size(tmp_path: Path) -> None:
    image = np.random.default_rng(4).normal(size=(30, 47)).astype(np.float32)
    path = tmp_path / "mic.mrc"
    write_micrograph(path, image, 1.25)
    data, info = read_micrograph(path)
    np.testing.assert_array_equal(data, image)
    assert info.pixel_size_a == pytest.approx(1.25)
    assert info.ispg == 0
    assert check_complete(path).complete
    write_micrograph(tmp_path / "half.mrc", image, None, float16=True)
    half, info = read_micrograph(tmp_path / "half.mrc")
    assert info.mode == 12
    np.testing.assert_allclose(half, image, rtol=1e-3, atol=1e-3)

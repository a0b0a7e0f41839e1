"""One unit of work: one micrograph through the chain, in a worker process.

The worker gets paths and settings (a :class:`MicrographJob`, small and picklable), reads the
micrograph and its picks itself, runs the chain in chunks of particles (memory stays bounded
whatever the number of picks), writes each stream's stack and per-micrograph STAR file under
**temporary names** (fsynced), and returns a small :class:`JobResult`. Making outputs visible
(rename) is the committer's job: :func:`commit_job` in the batch command, the service's commit
step in the daemon. A job that fails leaves nothing under a final name.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flybox.errors import MrcFormatError, ProcessingError
from flybox.io.atomic import rename_into_place, temp_path_for
from flybox.io.coords import pick_columns, read_coordinates
from flybox.io.fftw_wisdom import FileWisdomStore, default_wisdom_path
from flybox.io.mrc import StackWriter, read_micrograph
from flybox.io.star import format_star_block
from flybox.pipeline.chain import Chain, ChainSpec
from flybox.pipeline.checks import outside_picks_warning, pixel_size_warning
from flybox.pipeline.layout import optics_table, particle_rows, project_path, stream_paths
from flybox.processors.base import Micrograph
from flybox.processors.coordinates import rescale_coordinates
from flybox.processors.fft import use_wisdom_store
from flybox.types import CtfParams, ImageStats, OpticsGroup

__all__ = [
    "PICK_ORIGIN_COLUMN",
    "JobResult",
    "JobWarnings",
    "MicrographJob",
    "Picker",
    "StreamOutput",
    "chain_for",
    "commit_job",
    "discard_job",
    "run_job",
]


#: The picks' origin column (``auto``, ``manual``, ``external``) of a picking session.
PICK_ORIGIN_COLUMN = "flyboxPickOrigin"


class Picker(Protocol):
    """Picks a micrograph in the worker (the service's ``autopick`` step, before ``extract``):
    a small picklable object, called with the micrograph and its output stem; returns the picks
    (micrograph pixels) and figures for the job's stats."""

    def __call__(self, image: Any, stem: str) -> tuple[pd.DataFrame, dict[str, float]]: ...


@dataclass
class MicrographJob:
    """Everything a worker needs to process one micrograph (paths and settings only).

    Attributes
    ----------
    micrograph
        Path of the MRC file.
    name
        ``rlnMicrographName`` for the particle rows (usually the path as the user gave it).
    output_dir
        The output folder (``OUT``); stacks go to ``OUT/<StreamFolder>/<stem>.mrcs``.
    chain
        The chain, as a complete spec (:attr:`flybox.pipeline.chain.Chain.spec`).
    picks
        The picks, already read (multi-micrograph pick files, re-centred particles); or
        ``None`` to read ``coordinates`` in the worker.
    coordinates, coordinate_format, min_fom, cs_flip_y
        The coordinate file and how to read it.
    ctf
        The micrograph's CTF, if known.
    optics
        Its optics group (voltage, Cs, Q0, micrograph pixel size).
    pixel_size_a
        Micrograph pixel size in Å; ``None`` takes the MRC header.
    picking_pixel_size_a
        Pixel size the coordinates refer to; coordinates are rescaled when it differs.
    float16
        Write stacks in mode 12 with RELION's float16 rules.
    project_dir
        The project folder: paths in STAR rows are relative to it (default: the working
        directory of the worker, which is the one of the process that started it).
    stem
        Output file stem; default: the micrograph file's stem.
    chunk_size
        Particles per processing chunk.
    picker
        The autopick step: used when neither ``picks`` nor ``coordinates`` is given; every
        pick then also carries its origin (``flyboxPickOrigin``), external ones too.
    unit
        The unit of work and attempt this job is (the service's unit key), for an executor's
        task names; ``None`` outside the service.
    temp_tag
        Name the temporary files ``.<name>.<temp_tag>.tmp`` instead of a random tag, so that
        an executor can find and remove those of an attempt that will never be committed.
    """

    micrograph: str
    name: str
    output_dir: str
    chain: ChainSpec
    picks: pd.DataFrame | None = None
    coordinates: str | None = None
    coordinate_format: str | None = None
    min_fom: float | None = None
    cs_flip_y: bool = True
    ctf: CtfParams | None = None
    optics: OpticsGroup = field(default_factory=OpticsGroup)
    pixel_size_a: float | None = None
    picking_pixel_size_a: float | None = None
    float16: bool = False
    project_dir: str | None = None
    stem: str | None = None
    chunk_size: int = 32
    picker: Picker | None = None
    unit: str | None = None
    temp_tag: str | None = None

    @property
    def output_stem(self) -> str:
        """Stem of this micrograph's output files."""
        return self.stem or Path(self.micrograph).stem


@dataclass
class StreamOutput:
    """One stream's outputs of one micrograph, written under temporary names."""

    stream: str
    box: int
    pixel_size_a: float
    count: int
    rows: pd.DataFrame
    stack_temp: str | None
    stack_final: str
    star_temp: str | None
    star_final: str


@dataclass
class JobResult:
    """What a worker hands back: small metadata, never image data."""

    micrograph: str
    name: str
    picks: int
    excluded: int
    streams: dict[str, StreamOutput]
    seconds: float
    pixel_size_a: float
    stats: dict[str, float] = field(default_factory=dict)
    #: One-line warnings about settings that probably lose particles (a pixel size that
    #: disagrees with the header, most picks outside the micrograph); the caller logs them.
    warnings: list[str] = field(default_factory=list)

    @property
    def particles(self) -> int:
        """Particles written per stream (the same for every stream)."""
        return max((s.count for s in self.streams.values()), default=0)


class JobWarnings:
    """Logs the warnings of job results, each distinct one once (a wrong pixel size would
    otherwise be reported for every micrograph), and at most ``limit`` of them."""

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.suppressed = 0

    def report(self, result: JobResult) -> list[str]:
        """Log the new warnings of ``result``; returns them."""
        new = [w for w in dict.fromkeys(result.warnings) if w not in self.seen]
        for warning in new:
            self.seen.add(warning)
            if len(self.seen) <= self.limit:
                log.warning("%s", warning)
            else:
                self.suppressed += 1
        return new


_chains: dict[str, Chain] = {}


def chain_for(spec: ChainSpec) -> Chain:
    """The chain of a spec, built once per process and reused (steps keep per-shape caches)."""
    chain = _chains.get(spec.key)
    if chain is None:
        if len(_chains) >= 8:
            _chains.clear()
        chain = _chains[spec.key] = Chain.from_config(spec)
    return chain


def _load_picks(job: MicrographJob, pixel_size_a: float) -> pd.DataFrame:
    if job.picks is not None:
        picks = job.picks.copy()
    elif job.coordinates is not None:
        picks = read_coordinates(
            job.coordinates,
            fmt=job.coordinate_format,  # type: ignore[arg-type]
            min_fom=job.min_fom,
            cs_flip_y=job.cs_flip_y,
        )
    else:
        raise ProcessingError(job.micrograph, "no coordinates for this micrograph")
    picks = pick_columns(picks)  # a picks file's other rln* columns stay out of the outputs
    picks = picks.drop(columns=["rlnMicrographName", "rlnImageName"], errors="ignore")
    picks = picks.drop(columns=["rlnParticleSelectionType"], errors="ignore")
    if job.picking_pixel_size_a is not None and abs(job.picking_pixel_size_a - pixel_size_a) > 1e-6:
        picks = rescale_coordinates(picks, job.picking_pixel_size_a / pixel_size_a)
    return picks.reset_index(drop=True)


def _with_origins(picks: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, float]]:
    """Picks with an origin for each (``external`` unless said), and the count per origin."""
    if PICK_ORIGIN_COLUMN not in picks.columns:
        picks = picks.assign(**{PICK_ORIGIN_COLUMN: "external"})
    origins = picks[PICK_ORIGIN_COLUMN].astype(str)
    counts = {f"picks_{o}": float((origins == o).sum()) for o in ("auto", "manual", "external")}
    return picks, counts


#: The largest magnitude float16 holds (beyond it: Inf).
_FLOAT16_MAX = 65504.0


def _check_finite(
    job: MicrographJob, stream: str, images: np.ndarray[Any, Any], stats: ImageStats | None
) -> None:
    """No particle with a non-finite value is written (values near float32's limit overflow
    in processing; beyond 65504 float16 gives Inf).

    With the statistics the last step computed (the normalisation kernel's), no pass over the
    pixels is needed: every pixel is finite exactly when the float64 sums behind each
    variance are (a finite float32 squared cannot overflow float64; the kernels' fast-math
    flags reorder sums but never assume finite values) and so are the minimum and maximum.
    """
    if stats is not None and len(stats.variances) == len(images):
        finite = bool(
            np.isfinite(stats.variances).all()
            and np.isfinite(stats.means).all()
            and np.isfinite(stats.minimum)
            and np.isfinite(stats.maximum)
        )
        largest = max(abs(stats.minimum), abs(stats.maximum)) if finite else np.inf
    else:
        finite = bool(np.isfinite(images).all())
        largest = float(np.abs(images).max()) if finite and images.size else 0.0
    if not finite:
        raise MrcFormatError(
            job.micrograph,
            f"{stream}: processing gave non-finite values (pixel values too large?)",
        )
    if job.float16 and largest > _FLOAT16_MAX:
        raise MrcFormatError(
            job.micrograph, f"{stream}: particle values beyond float16's range (65504)"
        )


def use_disk_wisdom() -> None:
    """Keep FFTW plans measured by any flybox process of this host (idempotent)."""
    global _wisdom_on_disk
    if not _wisdom_on_disk:
        _wisdom_on_disk = True
        use_wisdom_store(FileWisdomStore(default_wisdom_path()))


_wisdom_on_disk = False

log = logging.getLogger(__name__)


def _temp_name(job: MicrographJob, final: str) -> str:
    if job.temp_tag is None:
        return str(temp_path_for(final))
    path = Path(final)
    return str(path.with_name(f".{path.name}.{job.temp_tag}.tmp"))


def run_job(job: MicrographJob) -> JobResult:
    """Process one micrograph; outputs are left under temporary names.

    Raises
    ------
    flybox.errors.InputError
        When the micrograph or its coordinates cannot be read (quarantine the input).
    flybox.errors.ProcessingError
        When the inputs cannot be processed as requested (no pixel size, no CTF for a flip).
    """
    use_disk_wisdom()
    started = time.perf_counter()
    chain = chain_for(job.chain)
    image, info = read_micrograph(job.micrograph, mmap=True)
    if not np.isfinite(image).all():  # NaN/Inf pixels would give NaN particles
        bad = int(np.count_nonzero(~np.isfinite(image)))
        raise MrcFormatError(job.micrograph, f"{bad} non-finite pixel values (NaN or Inf)")
    pixel_size = job.pixel_size_a or job.optics.micrograph_pixel_size_a or info.pixel_size_a
    if not pixel_size:
        raise ProcessingError(job.micrograph, "no pixel size in the header; set --pixel-size")
    if chain.requires_ctf and (job.ctf is None or not job.ctf.complete):
        raise ProcessingError(job.micrograph, "the chain needs a CTF (voltage, Cs, Q0, defocus)")
    picked: dict[str, float] = {}
    if job.picks is None and job.coordinates is None and job.picker is not None:
        # The autopick step: coordinates in this micrograph's pixels, nothing to rescale.
        picks, picked = job.picker(image, job.output_stem)
        picks = picks.reset_index(drop=True)
    else:
        picks = _load_picks(job, pixel_size)
    if job.picker is not None:
        picks, origins = _with_origins(picks)
        picked.update(origins)
    warnings = [
        warning
        for warning in (
            pixel_size_warning(
                job.pixel_size_a, info.pixel_size_a, "the pixel size", "the MRC header"
            ),
            pixel_size_warning(
                job.pixel_size_a,
                job.optics.micrograph_pixel_size_a,
                "the pixel size",
                "the micrographs STAR / CTF table",
            ),
            outside_picks_warning(
                picks, (image.shape[-2], image.shape[-1]), job.micrograph, job.picking_pixel_size_a
            ),
        )
        if warning is not None
    ]
    micrograph = chain.prepare(Micrograph(image, pixel_size, job.name, picks, job.ctf))
    picks = micrograph.picks

    folder_paths = {s: stream_paths(job.output_dir, s, job.output_stem) for s in chain.streams}
    writers: dict[str, StackWriter] = {}
    temps: dict[str, str] = {}
    tables: dict[str, list[pd.DataFrame]] = {s: [] for s in chain.streams}
    pixel_sizes: dict[str, float] = {}
    boxes: dict[str, int] = dict(chain.streams)
    excluded = 0
    try:
        for start in range(0, len(picks), job.chunk_size):
            chunk = micrograph.with_picks(picks.iloc[start : start + job.chunk_size])
            stacks, chunk_excluded = chain.particles(chunk)
            excluded += chunk_excluded
            for stream, stack in stacks.items():
                if len(stack) == 0:
                    continue
                if stream not in writers:
                    stack_final = folder_paths[stream][0]
                    os.makedirs(os.path.dirname(stack_final), exist_ok=True)
                    temps[stream] = _temp_name(job, stack_final)
                    # No fsync here: commit_job() flushes before renaming (crash safety),
                    # off this worker's critical path.
                    writers[stream] = StackWriter(
                        temps[stream],
                        stack.box,
                        stack.pixel_size_a,
                        float16=job.float16,
                        sync=False,
                    )
                images = stack.real()
                _check_finite(job, stream, images, stack.image_stats)
                writers[stream].append(images, stack.image_stats)
                tables[stream].append(stack.table)
                pixel_sizes[stream] = stack.pixel_size_a
                boxes[stream] = stack.box
        for writer in writers.values():
            writer.close()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise

    outputs: dict[str, StreamOutput] = {}
    for stream in chain.streams:
        stack_final, star_final, _ = folder_paths[stream]
        box = boxes[stream]
        pixel = pixel_sizes.get(stream, pixel_size * chain.extraction_box / box)
        table = pd.concat(tables[stream], ignore_index=True) if tables[stream] else pd.DataFrame()
        rows = particle_rows(
            table,
            project_path(stack_final, job.project_dir),
            job.optics.number,
            job.ctf,
            micrograph_name=project_path(job.micrograph, job.project_dir),
        )
        star_temp = None
        if len(rows):
            optics = optics_table([job.optics], pixel, box)
            star_temp = _temp_name(job, star_final)
            text = format_star_block("optics", optics) + "\n" + format_star_block("particles", rows)
            with open(star_temp, "w") as handle:
                handle.write(text)
        outputs[stream] = StreamOutput(
            stream=stream,
            box=box,
            pixel_size_a=pixel,
            count=len(rows),
            rows=rows,
            stack_temp=temps.get(stream),
            stack_final=stack_final,
            star_temp=star_temp,
            star_final=star_final,
        )
    stats = dict(micrograph.stats)
    stats.update(picked)
    return JobResult(
        micrograph=job.micrograph,
        name=job.name,
        picks=len(picks),
        excluded=excluded,
        streams=outputs,
        seconds=time.perf_counter() - started,
        pixel_size_a=pixel_size,
        stats={k: float(v) for k, v in stats.items() if np.isfinite(v)},
        warnings=warnings,
    )


def commit_job(result: JobResult) -> None:
    """Make a job's outputs visible: flush each temporary file to disk, then rename it to its
    final name (:func:`flybox.io.atomic.publish`)."""
    for output in result.streams.values():
        if output.stack_temp is not None:
            rename_into_place(output.stack_temp, output.stack_final)
        if output.star_temp is not None:
            rename_into_place(output.star_temp, output.star_final)


def discard_job(result: JobResult) -> None:
    """Remove a job's temporary files (a superseded or abandoned attempt)."""
    for output in result.streams.values():
        for temp in (output.stack_temp, output.star_temp):
            if temp is not None:
                Path(temp).unlink(missing_ok=True)

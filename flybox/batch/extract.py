"""``flybox extract``: batch extraction of many micrographs with a pool of worker processes.

Each micrograph is one :class:`~flybox.pipeline.job.MicrographJob`; workers write outputs under
temporary names and this process commits them (rename) as they complete, then writes the
cumulative STAR file of every stream once at the end. A micrograph that fails is reported
in one line naming the file and the problem; the others go on.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from flybox.errors import ConfigError, FlyboxError, InputError, ProcessingError
from flybox.io.ctf import read_ctf
from flybox.io.mrc import read_header
from flybox.io.star import read_relion_star
from flybox.pipeline.chain import ChainSpec
from flybox.pipeline.inputs import CoordinateSource, MicrographSource, find_micrographs
from flybox.pipeline.job import (
    JobResult,
    JobWarnings,
    MicrographJob,
    chain_for,
    commit_job,
    run_job,
)
from flybox.pipeline.layout import ParticleSet, project_folder
from flybox.pipeline.matching import match_name, micrograph_stem
from flybox.pipeline.workers import worker_pool
from flybox.processors.coordinates import recenter_picks

if TYPE_CHECKING:
    from flybox.pipeline.dask import DaskBatch

__all__ = ["ExtractPlan", "ExtractRequest", "ExtractSummary", "plan_extraction", "run_extraction"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractRequest:
    """What a batch extraction is asked to do (the options of ``flybox extract``, resolved).

    Attributes
    ----------
    micrographs
        A glob, or a micrographs STAR file.
    output_dir
        The output folder.
    chain
        The processing chain (validated).
    coords, coord_suffix, min_fom, cs_flip_y
        Where the picks are and how to read them.
    ctf
        A CTF source overriding the micrographs STAR file's.
    recenter
        A refined particle STAR file whose shifts re-centre the particles (instead of picks).
    pixel_size_a, picking_pixel_size_a
        Overrides of the micrograph pixel size and the pixel size of the coordinates, in Å.
    float16
        Write stacks in mode 12.
    project_dir
        The project folder STAR paths are relative to (default: the working directory).
    """

    micrographs: str
    output_dir: str
    chain: ChainSpec
    coords: str | None = None
    coord_suffix: str | None = None
    min_fom: float | None = None
    cs_flip_y: bool = True
    ctf: str | None = None
    recenter: str | None = None
    pixel_size_a: float | None = None
    picking_pixel_size_a: float | None = None
    float16: bool = False
    project_dir: str | None = None


@dataclass
class ExtractPlan:
    """The jobs of a batch and what could not be planned."""

    jobs: list[MicrographJob]
    output_dir: str
    streams: dict[str, int]
    without_coordinates: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class ExtractSummary:
    """What a batch did."""

    micrographs: int
    failed: list[str]
    without_coordinates: int
    particles: dict[str, int]
    boxes: dict[str, int]
    #: Image pixel size in Å per stream and optics group number.
    pixel_sizes: dict[str, dict[int, float]]
    excluded: int
    seconds: float
    normalisation: str | None = None

    def _pixel_sizes(self, stream: str) -> str:
        sizes = self.pixel_sizes.get(stream, {})
        if not sizes:
            return ""
        if len(set(sizes.values())) == 1:
            return f", {next(iter(sizes.values())):.4g} Å"
        groups = ", ".join(f"optics group {g} {sizes[g]:.4g} Å" for g in sorted(sizes))
        return f"; {groups}"

    def line(self) -> str:
        """The final one-line summary printed by ``flybox extract``."""
        streams = ", ".join(
            f"{s} {self.particles.get(s, 0)} ({self.boxes[s]} px{self._pixel_sizes(s)})"
            for s in self.boxes
        )
        rate = self.micrographs / self.seconds if self.seconds > 0 else 0.0
        noun = "micrograph" if self.micrographs == 1 else "micrographs"
        text = (
            f"extracted {self.micrographs} {noun}: {streams}; "
            f"{self.excluded} excluded at the border; {self.seconds:.2f} s, "
            f"{rate:.2f} micrographs/s"
        )
        if self.normalisation:
            text += f"; normalisation {self.normalisation}"
        if self.failed:
            text += f"; {len(self.failed)} failed"
        if self.without_coordinates:
            text += f"; {self.without_coordinates} without coordinates"
        return text


def _recentred(
    star: str, source: MicrographSource, pixel_sizes: dict[str, float]
) -> dict[str, Any]:
    table = read_relion_star(star, "particles")
    if "rlnMicrographName" not in table.rows:
        raise InputError(star, "no rlnMicrographName column: cannot group particles by micrograph")
    optics = table.optics
    pixel_by_group: dict[int, float] = {}
    if optics is not None and "rlnImagePixelSize" in optics:
        for _, row in optics.iterrows():
            pixel_by_group[int(row["rlnOpticsGroup"])] = float(row["rlnImagePixelSize"])
    groups = {
        str(name): rows.reset_index(drop=True)
        for name, rows in table.rows.groupby("rlnMicrographName", sort=False)
    }
    picks: dict[str, Any] = {}
    for entry in source.entries:
        rows = match_name(groups, entry.name)
        if rows is None:
            continue
        particle_pixel: float | npt.NDArray[Any]
        if pixel_by_group and "rlnOpticsGroup" in rows:
            particle_pixel = rows["rlnOpticsGroup"].map(pixel_by_group).to_numpy(dtype=float)
        else:
            particle_pixel = pixel_sizes[entry.path]
        picks[entry.path] = recenter_picks(
            rows,
            particle_pixel_size_a=particle_pixel,
            micrograph_pixel_size_a=pixel_sizes[entry.path],
        )
    return picks


def plan_extraction(request: ExtractRequest) -> ExtractPlan:
    """Resolve inputs into jobs (no image is read; headers only when pixel sizes are needed).

    Raises
    ------
    flybox.errors.FlyboxError
        For unusable inputs or settings (one line naming the file or key).
    """
    built = chain_for(request.chain)
    project_dir = str(project_folder(request.project_dir))
    source = find_micrographs(request.micrographs, project_dir)
    ctfs = dict(source.ctfs)
    if request.ctf is not None:
        ctfs = read_ctf(request.ctf)
    pixel_sizes: dict[str, float] = {}
    if request.recenter is not None:
        for entry in source.entries:
            size = (
                request.pixel_size_a
                or entry.optics.micrograph_pixel_size_a
                or read_header(entry.path).pixel_size_a
            )
            if not size:
                raise ProcessingError(entry.path, "no pixel size in the header; set --pixel-size")
            pixel_sizes[entry.path] = size
        recentred = _recentred(request.recenter, source, pixel_sizes)
        coordinates = CoordinateSource()
    else:
        recentred = {}
        coordinates = CoordinateSource.from_spec(
            request.coords,
            request.coord_suffix,
            min_fom=request.min_fom,
            cs_flip_y=request.cs_flip_y,
        )
    check_output_dir(request.output_dir)
    plan = ExtractPlan(jobs=[], output_dir=request.output_dir, streams=built.streams)
    stems: dict[str, str] = {}
    for entry in source.entries:
        if request.recenter is not None:
            picks = recentred.get(entry.path)
            coordinate_file = None
        else:
            coordinate_file, picks = coordinates.for_micrograph(entry.path, entry.name)
        if coordinate_file is None and picks is None:
            plan.without_coordinates.append(entry.path)
            continue
        stem = micrograph_stem(entry.path)
        if stem in stems:
            raise InputError(entry.path, f"same file name as {stems[stem]}: outputs would collide")
        stems[stem] = entry.path
        micrograph_ctf = entry.ctf if request.ctf is None else None
        if micrograph_ctf is None and ctfs:
            micrograph_ctf = match_name(ctfs, entry.name) or match_name(ctfs, entry.path)
        optics = entry.optics
        if micrograph_ctf is not None and optics.voltage_kv is None:
            optics = optics.with_optics_of(micrograph_ctf)
        if micrograph_ctf is not None and not micrograph_ctf.complete and optics.voltage_kv:
            micrograph_ctf = optics.complete_ctf(micrograph_ctf)
        plan.jobs.append(
            MicrographJob(
                micrograph=entry.path,
                name=entry.name,
                output_dir=request.output_dir,
                chain=request.chain,
                picks=picks,
                coordinates=coordinate_file,
                min_fom=request.min_fom,
                cs_flip_y=request.cs_flip_y,
                ctf=micrograph_ctf,
                optics=optics,
                pixel_size_a=request.pixel_size_a,
                picking_pixel_size_a=request.picking_pixel_size_a,
                float16=request.float16,
                project_dir=project_dir,
            )
        )
    if built.requires_ctf:
        missing = [job.micrograph for job in plan.jobs if job.ctf is None]
        if missing:
            raise ProcessingError(
                missing[0], f"no CTF found for {len(missing)} micrograph(s); give --ctf"
            )
    return plan


def check_output_dir(path: str) -> None:
    """Create the output folder if needed and make sure files can be written in it.

    Raises
    ------
    ConfigError
        ``-o``: one line saying why the folder cannot be used (a file by that name, no
        permission, a read-only file system…).
    """
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("-o", f"{path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".flybox-probe-"):
            pass
    except OSError as exc:
        raise ConfigError("-o", f"{path}: cannot write there ({exc.strerror or exc})") from None


def execute(
    jobs: Sequence[MicrographJob], pool: futures.ProcessPoolExecutor | None, workers: int
) -> Iterator[tuple[int, JobResult | BaseException]]:
    """Run jobs (in this process when ``pool`` is None), yielding ``(index, result or
    exception)`` as they finish. At most ``2 × workers`` jobs are in flight, so memory does
    not grow with the batch.
    """
    if pool is None:
        for index, job in enumerate(jobs):
            try:
                yield index, run_job(job)
            except (FlyboxError, OSError) as exc:
                yield index, exc
        return
    pending: dict[futures.Future[JobResult], int] = {}
    queue = iter(enumerate(jobs))
    exhausted = False
    while pending or not exhausted:
        while not exhausted and len(pending) < 2 * workers:
            try:
                index, job = next(queue)
            except StopIteration:
                exhausted = True
                break
            pending[pool.submit(run_job, job)] = index
        if not pending:
            break
        done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
        for future in done:
            index = pending.pop(future)
            error = future.exception()
            yield index, (error if error is not None else future.result())


def run_extraction(
    plan: ExtractPlan,
    *,
    workers: int = 2,
    progress: bool = True,
    pool: futures.ProcessPoolExecutor | None = None,
    dask: str | DaskBatch | None = None,
) -> ExtractSummary:
    """Run a planned batch, commit outputs, write every stream's STAR file, summarise.

    Parameters
    ----------
    plan
        From :func:`plan_extraction`.
    workers
        Worker processes (1: in this process).
    progress
        Show a progress bar on stderr.
    pool
        A pool started earlier (:func:`flybox.pipeline.workers.worker_pool`, e.g. while the
        batch was planned); it is shut down at the end. Default: one is made here when it pays.
    dask
        A Dask scheduler address, or ``"local"`` (``workers`` processes here), to run the jobs
        on (:func:`flybox.pipeline.dask.run_on_dask`) instead of the local pool; or a
        :class:`~flybox.pipeline.dask.DaskBatch` started earlier (e.g. while the batch was
        planned), closed at the end.
    """
    from tqdm import tqdm

    started = time.perf_counter()
    check_output_dir(plan.output_dir)
    results: dict[int, JobResult] = {}
    failed: list[str] = []
    # The pool first: its workers are forked before any thread starts (progress bar,
    # committer).
    if pool is None and dask is None and workers > 1 and len(plan.jobs) > 1:
        pool = worker_pool(workers)
    bar = tqdm(total=len(plan.jobs), unit="mic", disable=not progress or None, file=sys.stderr)
    # Commits (fsync + rename) run on their own thread, so that waiting for the disk never
    # delays handing the next micrograph to a worker.
    committer = futures.ThreadPoolExecutor(1, thread_name_prefix="flybox-commit")
    warnings = JobWarnings()
    commits: list[futures.Future[None]] = []
    try:
        if isinstance(dask, str):
            from flybox.pipeline.dask import run_on_dask

            outcomes = run_on_dask(plan.jobs, dask, workers)
        elif dask is not None:
            outcomes = dask.run(plan.jobs)
        else:
            outcomes = execute(plan.jobs, pool, workers)
        for index, outcome in outcomes:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, FlyboxError | OSError):
                    raise outcome
                message = (
                    str(outcome)
                    if isinstance(outcome, FlyboxError)
                    else (f"{plan.jobs[index].micrograph}: {type(outcome).__name__}: {outcome}")
                )
                failed.append(message)
                bar.write(message, file=sys.stderr)
            else:
                warnings.report(outcome)
                commits.append(committer.submit(commit_job, outcome))
                results[index] = outcome
            bar.update(1)
        for commit in commits:
            commit.result()
        if warnings.suppressed:
            log.warning("%d more warnings like these", warnings.suppressed)
    finally:
        committer.shutdown(wait=True)
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if dask is not None and not isinstance(dask, str):
            dask.close()
    sets = {stream: ParticleSet(plan.output_dir, stream) for stream in plan.streams}
    boxes = dict(plan.streams)
    pixel_sizes: dict[str, dict[int, float]] = {}
    excluded = 0
    for index in sorted(results):
        result = results[index]
        excluded += result.excluded
        job = plan.jobs[index]
        for stream, output in result.streams.items():
            sets[stream].add(output.rows, job.optics, output.pixel_size_a, output.box)
            if output.count:
                boxes[stream] = output.box
                pixel_sizes.setdefault(stream, {})[job.optics.number] = output.pixel_size_a
    for particle_set in sets.values():
        particle_set.write()
    missing = next((m for s in sets.values() if (m := s.missing_optics())), [])
    if missing:
        log.warning(
            "the optics table has no %s: RELION 3.1 cannot read the particles without them; "
            "give a micrographs STAR file with optics (e.g. CtfFind/jobNNN/micrographs_ctf.star) "
            "or --ctf",
            ", ".join(missing),
        )
    return ExtractSummary(
        micrographs=len(results),
        failed=failed,
        without_coordinates=len(plan.without_coordinates),
        particles={stream: s.count for stream, s in sets.items()},
        boxes=boxes,
        pixel_sizes=pixel_sizes,
        excluded=excluded,
        seconds=time.perf_counter() - started,
        normalisation=_normalisation(plan.jobs[0].chain) if plan.jobs else None,
    )


def _normalisation(chain: ChainSpec) -> str:
    """The normalisation method of a chain, as the summary states it."""
    methods = [str(s.settings.get("method", "ramp")) for s in chain.steps if s.step == "normalize"]
    return methods[0] if methods else "none"

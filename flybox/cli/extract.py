"""``flybox extract``: its options, the chain they describe, and running it (DESIGN.md §7).

The work itself is in :mod:`flybox.batch.extract`; this module turns command-line options into a
processing chain (``--convention`` presets plus explicit options) and a batch plan.
"""

from __future__ import annotations

import argparse
import logging

from flybox.errors import ConfigError
from flybox.pipeline.chain import ChainSpec, StepSpec

__all__ = ["DESCRIPTION", "add_arguments", "extract_chain", "run"]


log = logging.getLogger("flybox")

DESCRIPTION = (
    "Extract particles from micrographs into RELION-ready stacks and STAR files: "
    "OUT/particles.star + OUT/Particles/<mic>.mrcs, and with --fcrop-small also "
    "OUT/particles_small.star + OUT/ParticlesSmall/<mic>.mrcs, in one pass. "
    "Sizes are in pixels, pixel sizes in Å."
)

#: Options that shape the chain; with ``-c CONFIG`` the chain comes from the file
#: instead and these must not be given.
_CHAIN_OPTIONS = (
    "box",
    "fcrop",
    "fcrop_small",
    "rescale_factor",
    "target_pixel_size",
    "force_box",
    "border",
    "center_rounding",
    "dust",
    "dust_mode",
    "invert",
    "norm",
    "bg_radius",
    "sigma",
    "background",
    "phase_flip",
    "flip_mode",
    "descriptors",
    "patch_size",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``flybox extract`` options to ``p`` (help texts give units and defaults)."""
    io = p.add_argument_group("inputs and outputs")
    io.add_argument(
        "--micrographs",
        required=True,
        metavar="GLOB|STAR",
        help="micrograph files (glob, ** for any folders) or a RELION micrographs "
        "STAR file (its CTF columns, if any, are the CTF source)",
    )
    io.add_argument(
        "--coords",
        metavar="GLOB|DIR|FILE",
        help="coordinate files: a glob, a folder searched for <stem><suffix> "
        "(also RELION's <dir>/<micrograph path><suffix>), or one file covering "
        "several micrographs (cryoSPARC .cs, Topaz .txt, STAR with "
        "rlnMicrographName); default: beside each micrograph",
    )
    io.add_argument(
        "--coord-suffix",
        metavar="S",
        help="coordinate file suffix after the micrograph stem, e.g. _autopick.star "
        "(default: try _autopick.star .star .box .cbox .pos .txt .coords)",
    )
    io.add_argument(
        "--min-fom",
        type=float,
        metavar="F",
        help="keep picks with figure of merit > F (RELION --minimum_pick_fom)",
    )
    io.add_argument(
        "--cs-flip-y",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cryoSPARC picks: y = (1 - center_y_frac) * ny (pyem's convention)",
    )
    io.add_argument(
        "--ctf",
        metavar="FILE",
        help="CTF source: RELION micrographs STAR, CTFFIND4 .txt or cryoSPARC .cs; "
        "overrides the CTF of --micrographs STAR",
    )
    io.add_argument(
        "--recenter",
        metavar="STAR",
        help="re-extract the particles of this RELION particles STAR, re-centred "
        "on their rlnOriginX/YAngst (integer shift + residual origin)",
    )
    io.add_argument(
        "--pixel-size",
        type=float,
        metavar="A",
        help="micrograph pixel size in Å (default: micrographs STAR optics, else the MRC header)",
    )
    io.add_argument(
        "--picking-pixel-size",
        type=float,
        metavar="A",
        help="pixel size the coordinates refer to; coordinates are rescaled to "
        "the micrograph pixel size when it differs",
    )
    io.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    io.add_argument(
        "--project-dir",
        metavar="DIR",
        help="the RELION project folder: every path written into a STAR file is relative to "
        "it, as RELION reads them (default: the working directory)",
    )
    io.add_argument(
        "--float16",
        action="store_true",
        help="write stacks as float16 (MRC mode 12, RELION's rounding rules)",
    )
    io.add_argument(
        "-c",
        "--config",
        metavar="CONFIG",
        help="take the chain ([[chain]]), [micrograph] and [output] settings from "
        "this TOML file instead of the processing options below",
    )
    proc = p.add_argument_group(
        "processing (docs/conventions.md explains each convention and how to choose)"
    )
    proc.add_argument(
        "--convention",
        choices=["relion", "xmipp"],
        default="relion",
        help="defaults for the options below: relion = trunc centres, border "
        "fill, per-particle dust, box-level flip, RELION normalisation; "
        "xmipp = rounded centres, border skip, micrograph dust and flip, "
        "Xmipp normalisation",
    )
    proc.add_argument(
        "--box",
        type=int,
        metavar="N",
        help="extraction box in micrograph pixels (even for relion); default: "
        "1.5 x the picking box, rounded up to an FFT-efficient size, when "
        "the coordinates carry a box size",
    )
    proc.add_argument(
        "--fcrop",
        type=int,
        metavar="N",
        help="Fourier-crop the main set (particles) to N px (default: no crop)",
    )
    proc.add_argument(
        "--fcrop-small",
        type=int,
        metavar="N",
        help="also write a small set (particles_small) Fourier-cropped to N px",
    )
    scale = proc.add_mutually_exclusive_group()
    scale.add_argument(
        "--rescale-factor",
        type=float,
        metavar="F",
        help="rescale the main set by F (output box 2*round(N*F/2))",
    )
    scale.add_argument(
        "--target-pixel-size",
        type=float,
        metavar="A",
        help="rescale the main set to about A Å/px (even box)",
    )
    proc.add_argument(
        "--force-box",
        type=int,
        metavar="N",
        help="forced output box of the main set: real-space crop/zero-pad around "
        "the centre after rescaling (RELION --window)",
    )
    proc.add_argument(
        "--border",
        choices=["fill", "skip"],
        help="boxes crossing the micrograph edge: fill with the nearest pixels "
        "(relion default) or skip them (xmipp default); the fraction outside "
        "is written as _flyboxBorderFraction",
    )
    proc.add_argument(
        "--center-rounding",
        choices=["trunc", "round", "floor"],
        help="float pick to integer box centre (relion: trunc, xmipp: round)",
    )
    proc.add_argument(
        "--dust",
        type=float,
        metavar="SIGMA",
        help="remove dust beyond SIGMA standard deviations (default: off)",
    )
    proc.add_argument(
        "--dust-mode",
        choices=["micrograph", "particle"],
        help="micrograph: Xmipp's deterministic 5x5 median (xmipp default); "
        "particle: RELION's white/black dust with seeded random replacement "
        "(relion default)",
    )
    proc.add_argument("--invert", action="store_true", help="invert contrast (x -> -x)")
    proc.add_argument(
        "--norm",
        choices=["none", "whole", "background", "ramp"],
        help="normalisation (default: ramp, RELION's --norm with a plane fitted to the "
        "background; note that relion_preprocess's own default is no normalisation)",
    )
    proc.add_argument(
        "--bg-radius",
        type=float,
        metavar="R",
        help="background radius in pixels of the extraction box, scaled to each "
        "set as int(R*M/N) (default: relion int(0.375*box), xmipp int(box/2))",
    )
    proc.add_argument(
        "--sigma",
        choices=["population", "sample"],
        help="normalisation σ estimator: population (n, relion default) or sample "
        "(n-1, xmipp default)",
    )
    proc.add_argument(
        "--background",
        choices=["strict", "inclusive"],
        help="normalisation background set: strict r > R (relion default) or inclusive "
        "r >= R (xmipp default)",
    )
    proc.add_argument(
        "--phase-flip",
        action="store_true",
        help="CTF phase flip (needs a CTF: --ctf or a micrographs STAR with CTF)",
    )
    proc.add_argument(
        "--flip-mode",
        choices=["box", "micrograph"],
        help="box: RELION's per-box flip incl. phase shift (relion default); "
        "micrograph: Xmipp's whole-micrograph flip (xmipp default)",
    )
    proc.add_argument(
        "--descriptors",
        action="store_true",
        help="add _flyboxLocalVariance, _flyboxGini and _flyboxLocalAverage "
        "(Xmipp's local quality descriptors)",
    )
    proc.add_argument(
        "--patch-size",
        type=int,
        metavar="P",
        help="descriptor patch size in micrograph pixels (default: 1.5 x box)",
    )
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--dask",
        metavar="ADDRESS",
        help='run on a Dask cluster: a scheduler address ("tcp://host:8786"), or "local" '
        "(--workers processes on this machine); needs flybox[dask] (docs/scaling.md)",
    )


def extract_chain(args: argparse.Namespace, box: int, pixel_size_a: float | None) -> ChainSpec:
    """The chain ``flybox extract`` runs for its options (see ``--help``)."""
    from flybox.processors.boxsize import check_box
    from flybox.processors.fourier import rescaled_box

    relion = args.convention == "relion"
    for warning in check_box(box, convention=args.convention, what="--box"):
        log.warning(warning)
    steps: list[StepSpec] = []
    dust_mode = args.dust_mode or ("particle" if relion else "micrograph")
    flip_mode = args.flip_mode or ("box" if relion else "micrograph")
    if args.dust is not None and dust_mode == "micrograph":
        steps.append(StepSpec("dust", {"sigma": args.dust}))
    if args.phase_flip and flip_mode == "micrograph":
        steps.append(StepSpec("phase_flip_micrograph"))
    if args.descriptors:
        steps.append(StepSpec("descriptors", {"patch_size": args.patch_size}))
    steps.append(
        StepSpec(
            "extract",
            {
                "box": box,
                "border": args.border or ("fill" if relion else "skip"),
                "center_rounding": args.center_rounding or ("trunc" if relion else "round"),
                "local_average": bool(args.descriptors),
            },
        )
    )
    if args.phase_flip and flip_mode == "box":
        steps.append(StepSpec("phase_flip"))
    main_box = box
    if args.fcrop is not None:
        if args.rescale_factor is not None or args.target_pixel_size is not None:
            raise ConfigError("--fcrop", "give --fcrop or a rescale option, not both")
        main_box = args.fcrop
    elif args.rescale_factor is not None:
        main_box = rescaled_box(box, factor=args.rescale_factor)
    elif args.target_pixel_size is not None:
        if pixel_size_a is None:
            raise ConfigError(
                "--target-pixel-size", "needs the micrograph pixel size (--pixel-size)"
            )
        main_box = rescaled_box(
            box, target_pixel_size_a=args.target_pixel_size, pixel_size_a=pixel_size_a
        )
    outputs = {"particles": main_box}
    if args.fcrop_small is not None:
        outputs["particles_small"] = args.fcrop_small
    for name, size in outputs.items():
        if size != box:
            for warning in check_box(size, convention=args.convention, what=f"{name} size"):
                log.warning(warning)
    if outputs != {"particles": box}:
        steps.append(StepSpec("fourier_crop", {"outputs": outputs}))
    if args.force_box is not None:
        steps.append(StepSpec("window", {"size": args.force_box, "streams": ["particles"]}))
    norm = args.norm or "ramp"
    particle_dust = args.dust is not None and dust_mode == "particle"
    if norm != "none" or particle_dust:
        steps.append(
            StepSpec(
                "normalize",
                {
                    "method": norm,
                    "bg_radius": args.bg_radius,
                    "convention": args.convention,
                    "sigma": args.sigma,
                    "background": args.background,
                    "white_dust": args.dust if particle_dust else -1.0,
                    "black_dust": args.dust if particle_dust else -1.0,
                },
            )
        )
    if args.invert:
        steps.append(StepSpec("invert"))
    return ChainSpec(tuple(steps))


def _picking_box(args: argparse.Namespace) -> float | None:
    """The picking box size carried by the first coordinate file found, if any."""
    from flybox.io.coords import read_coordinates
    from flybox.pipeline.inputs import CoordinateSource, find_micrographs

    source = find_micrographs(args.micrographs)
    coordinates = CoordinateSource.from_spec(args.coords, args.coord_suffix)
    for entry in source.entries:
        path, table = coordinates.for_micrograph(entry.path, entry.name)
        picks = table if table is not None else (read_coordinates(path) if path else None)
        if picks is not None and "box_size" in picks.attrs:
            return float(picks.attrs["box_size"])
    return None


def run(args: argparse.Namespace) -> int:
    """Run ``flybox extract``; returns the exit status (1 when some micrographs failed or no
    particle was extracted)."""
    from flybox.batch.extract import ExtractRequest, plan_extraction, run_extraction
    from flybox.io.mrc import read_header
    from flybox.pipeline.inputs import find_micrographs
    from flybox.pipeline.job import chain_for
    from flybox.pipeline.workers import worker_pool
    from flybox.processors.boxsize import suggest_box

    pixel_size = args.pixel_size
    picking_pixel_size = args.picking_pixel_size
    float16 = args.float16
    if args.config:
        given = [
            f"--{name.replace('_', '-')}"
            for name in _CHAIN_OPTIONS
            if getattr(args, name) not in (None, False)
        ]
        if given:
            raise ConfigError(given[0], "processing options cannot be combined with -c CONFIG")
        from flybox.config import load_config  # the configuration models: only with -c

        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise ConfigError(args.config, str(exc)) from exc
        chain = config.build_chain().spec
        pixel_size = pixel_size or config.micrograph.pixel_size
        picking_pixel_size = picking_pixel_size or config.micrograph.picking_pixel_size
        float16 = float16 or config.output.float16
    else:
        box = args.box
        if box is None:
            picking = _picking_box(args)
            if picking is None:
                raise ConfigError(
                    "--box", "required: the coordinates carry no box size to start from"
                )
            box = suggest_box(picking)
            log.info("box size %d px (1.5 x picking box %g px, FFT-efficient)", box, picking)
        known_pixel = pixel_size
        if known_pixel is None and args.target_pixel_size is not None:
            first = find_micrographs(args.micrographs).entries[0]
            known_pixel = (
                first.optics.micrograph_pixel_size_a or read_header(first.path).pixel_size_a
            )
        chain = extract_chain(args, box, known_pixel)
    # Workers start now, while the batch is planned: forked after the chain's steps are
    # imported and validated (they inherit them), they warm their kernels up meanwhile.
    chain_for(chain)
    pool = worker_pool(args.workers) if args.workers > 1 and args.dask is None else None
    dask = None
    if args.dask is not None:
        from flybox.pipeline.dask import DaskBatch

        # Likewise the Dask client connects and checks the workers while the batch is planned.
        dask = DaskBatch(args.dask, args.workers)
        dask.start()
    try:
        plan = plan_extraction(
            ExtractRequest(
                micrographs=args.micrographs,
                output_dir=args.output,
                chain=chain,
                coords=args.coords,
                coord_suffix=args.coord_suffix,
                min_fom=args.min_fom,
                cs_flip_y=args.cs_flip_y,
                ctf=args.ctf,
                recenter=args.recenter,
                pixel_size_a=pixel_size,
                picking_pixel_size_a=picking_pixel_size,
                float16=float16,
                project_dir=args.project_dir,
            )
        )
    except BaseException:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if dask is not None:
            dask.close()
        raise
    for path in plan.without_coordinates:
        log.warning("%s: no coordinates found; skipped", path)
    summary = run_extraction(
        plan, workers=args.workers, progress=not args.no_progress, pool=pool, dask=dask
    )
    print(summary.line())
    if not any(summary.particles.values()):
        log.error("no particle was extracted")
        return 1
    return 1 if summary.failed else 0

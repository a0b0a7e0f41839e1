"""The ``flybox`` command (DESIGN.md §7).

Subcommands: ``extract`` (batch extraction), ``mask`` (2D/3D masks), ``config check`` /
``config example``, ``run`` (the streaming service), ``simulate`` (a synthetic microscope),
``demo`` (both on temporary folders), ``status`` (a running service's status). Every error
is one line naming the file or key and the problem; exit code 0 on success, 1 when some
inputs failed (or ``status`` cannot reach the service), 2 for unusable options or
configuration.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from flybox import __version__
from flybox.errors import ConfigError, FlyboxError

__all__ = ["build_parser", "main"]

log = logging.getLogger("flybox")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _add_extract(sub: Any) -> None:
    from flybox import extract_command

    p = sub.add_parser(
        "extract",
        help="extract particles from micrographs (batch)",
        description=extract_command.DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    extract_command.add_arguments(p)


def _add_config(sub: Any) -> None:
    p = sub.add_parser("config", help="check or print a configuration file")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate FILE; print every error with its key path"
    )
    check.add_argument("file", metavar="FILE")
    config_sub.add_parser("example", help="print an annotated example configuration")


def _run_config(args: argparse.Namespace) -> int:
    from flybox.config import config_problems
    from flybox.config_example import EXAMPLE_CONFIG

    if args.config_command == "example":
        print(EXAMPLE_CONFIG, end="")
        return 0
    problems = config_problems(args.file)
    for problem in problems:
        print(f"{args.file}: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"{args.file}: ok")
    return 0


def _add_mask(sub: Any, with_arguments: bool) -> None:
    p = sub.add_parser(
        "mask",
        help="apply 2D masks to particles or 3D masks to volumes",
        description="Apply a 2D mask to particle stacks / particle STAR files, or a 3D mask "
        "to volumes. Sizes and radii in pixels.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    if with_arguments:  # importing the masking code costs ~0.5 s; only when it is used
        from flybox import masking

        masking.add_arguments(p)


def _add_status(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="show the status of a running service",
        description="Print the session status of a running flybox service (GET URL/api/status).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:9464", help="the service's [http] listen address"
    )
    p.add_argument(
        "--token",
        help="bearer token ([http] token) when the service requires one; "
        "default: the FLYBOX_TOKEN environment variable",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON report")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait")


def _run_status(args: argparse.Namespace) -> int:
    import shutil

    from flybox.daemon.status import fetch_status, render_status

    token = args.token or os.environ.get("FLYBOX_TOKEN") or None
    try:
        report = fetch_status(args.url, token, timeout=args.timeout)
    except FlyboxError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        width = max(shutil.get_terminal_size((120, 24)).columns, 80)
        print(render_status(report, width=width))
    return 0


def _add_run(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="the streaming service (foreground; systemd runs this)",
        description="Watch the [watch] folders and extract particles of every complete "
        "micrograph with picks (and CTF, when a source is configured) into the [session] "
        "output folder, until SIGTERM/SIGINT. Restarts continue where the journal says.",
    )
    p.add_argument("-c", "--config", required=True, metavar="CONFIG", help="TOML configuration")


def _exit_cleanly(number: int, frame: Any) -> None:
    raise SystemExit(0)


def _run_service(args: argparse.Namespace) -> int:
    import signal

    # Until the service takes over SIGTERM/SIGINT (it then drains), a stop request while it
    # is still starting is a clean exit: nothing has been taken yet.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from flybox.daemon.service import run

    return run(args.config)


def _add_simulate(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="write synthetic micrographs, picks and CTF over time (a fake microscope)",
        description="Write OUT/Micrographs/*.mrc (in place, in pieces, like acquisition "
        "software), OUT/AutoPick/*_autopick.star and OUT/micrographs_ctf.star at a rate.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("output", metavar="OUT", help="folder to write into")
    p.add_argument("--micrographs", type=int, default=20, metavar="N", help="how many")
    p.add_argument("--rate", type=float, default=30.0, metavar="PER_MIN", help="per minute")
    p.add_argument("--size", type=int, default=1024, metavar="PX", help="micrograph size")
    p.add_argument("--particles", type=int, default=100, metavar="N", help="per micrograph")
    p.add_argument("--pixel-size", type=float, default=1.0, metavar="A", help="in Å")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def _run_simulate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flybox.daemon.simulate import Acquisition, AcquisitionSettings

    settings = AcquisitionSettings(
        micrographs=args.micrographs,
        rate_per_minute=args.rate,
        size=args.size,
        particles=args.particles,
        pixel_size_a=args.pixel_size,
        seed=args.seed,
    )
    acquisition = Acquisition(Path(args.output), settings)
    written = acquisition.run(lambda item: log.info("%s: %d picks", item.path, item.picks))
    log.info("wrote %d micrographs into %s", len(written), args.output)
    return 0


def _add_demo(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="a simulated microscope and the service on temporary folders",
        description="Run flybox simulate and flybox run together on temporary folders with "
        "built-in settings (1024² micrographs, 128-px particles + 64-px small set), show "
        "progress, and print a summary. Takes about a minute.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--micrographs", type=int, default=20, metavar="N", help="how many")
    p.add_argument("--rate", type=float, default=30.0, metavar="PER_MIN", help="per minute")
    p.add_argument(
        "--keep",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="keep the folders in DIR (otherwise they are removed at the end)",
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes")


def _run_demo(args: argparse.Namespace) -> int:
    from flybox.daemon.demo import run_demo

    keep = getattr(args, "keep", None)
    summary = run_demo(args.micrographs, args.rate, keep, workers=args.workers)
    print(summary.line())
    print(f"output: {summary.output}" if keep else "output removed (keep it with --keep DIR)")
    return 0 if summary.micrographs and not summary.failed else 1


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``flybox`` command.

    Parameters
    ----------
    commands
        Subcommands whose full options are needed (``None``: all). Others are listed by name
        only, so that ``flybox extract`` does not import the masking code.
    """
    parser = argparse.ArgumentParser(
        prog="flybox",
        description="On-the-fly particle extraction and masking for cryo-EM.",
    )
    parser.add_argument("--version", action="version", version=f"flybox {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_extract(sub)
    _add_mask(sub, commands is None or "mask" in commands)
    _add_config(sub)
    _add_run(sub)
    _add_simulate(sub)
    _add_demo(sub)
    _add_status(sub)
    from flybox.pick import command as pick_command

    pick_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flybox`` command; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # One BLAS/OpenMP thread per process, whatever the environment says: parallelism comes
    # from worker processes, and BLAS threads in every worker would oversubscribe the cores
    # (measured: 3x slower normalisation). Set before numpy is imported.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    commands = [a for a in arguments if not a.startswith("-")][:1]
    parser = build_parser(None if not commands or "mask" in commands else commands)
    args = parser.parse_args(arguments)
    _configure_logging(args.verbose)
    try:
        if args.command == "extract":
            from flybox import extract_command

            return extract_command.run(args)
        if args.command == "mask":
            from flybox import masking

            return masking.run(args)
        if args.command == "config":
            return _run_config(args)
        if args.command == "run":
            return _run_service(args)
        if args.command == "simulate":
            return _run_simulate(args)
        if args.command == "demo":
            return _run_demo(args)
        if args.command == "status":
            return _run_status(args)
        if args.command == "pick":
            from flybox.pick import command as pick_command

            return pick_command.run(args)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except FlyboxError as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    parser.error(f"unknown command {args.command}")
    return 2

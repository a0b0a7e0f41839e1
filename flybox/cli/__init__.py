"""The ``flybox`` command (DESIGN.md §7): one module per subcommand, dispatched by a table.

Each subcommand module has an optional ``DESCRIPTION``, ``add_arguments(parser)``
and ``run(args) -> int``; only the module of the command being run is imported, so that
``flybox extract`` does not pay for the masking code or the service. Every error is one line
naming the file or key and the problem; exit code 0 on success, 1 when some inputs failed
(or ``status`` cannot reach the service), 2 for unusable options or configuration.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from flybox import __version__
from flybox.errors import FlyboxError

__all__ = ["COMMANDS", "build_parser", "entry", "main"]

log = logging.getLogger("flybox")


class Command(NamedTuple):
    """A subcommand: its module (imported only when used) and its one-line help."""

    module: str
    help: str


#: The subcommands, in the order ``flybox --help`` lists them.
COMMANDS: dict[str, Command] = {
    "extract": Command("flybox.cli.extract", "extract particles from micrographs (batch)"),
    "mask": Command("flybox.cli.mask", "apply 2D masks to particles or 3D masks to volumes"),
    "config": Command("flybox.cli.config", "check or print a configuration file"),
    "run": Command("flybox.cli.run", "the streaming service (foreground; systemd runs this)"),
    "simulate": Command(
        "flybox.cli.simulate",
        "write synthetic micrographs, picks and CTF over time (a fake microscope)",
    ),
    "demo": Command(
        "flybox.cli.demo", "a simulated microscope and the service on temporary folders"
    ),
    "status": Command("flybox.cli.status", "show the status of a running service"),
    "pick": Command(
        "flybox.cli.pick", "pick particles: a web picker with manual and supervised modes"
    ),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: not when its help already states it, and not when
    there is none to show (``None``, ``False``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action)


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


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``flybox`` command.

    Parameters
    ----------
    commands
        Subcommands whose full options are needed (``None``: all). Others are listed by name
        and help only, and their modules are not imported.
    """
    parser = argparse.ArgumentParser(
        prog="flybox",
        description="On-the-fly particle extraction, masking and picking for cryo-EM.",
    )
    parser.add_argument("--version", action="version", version=f"flybox {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        if commands is not None and name not in commands:
            sub.add_parser(name, help=command.help, add_help=False)
            continue
        module: Any = importlib.import_module(command.module)
        p = sub.add_parser(
            name,
            help=command.help,
            description=getattr(module, "DESCRIPTION", command.help),
            formatter_class=_HelpFormatter,
        )
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flybox`` command; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # One BLAS/OpenMP thread per process, whatever the environment says: parallelism comes
    # from worker processes, and BLAS threads in every worker would oversubscribe the cores
    # (measured: 3x slower normalisation). Set before numpy is imported.
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    named = [a for a in arguments if not a.startswith("-")][:1]
    selected = named if named and named[0] in COMMANDS else None
    parser = build_parser(selected)
    args = parser.parse_args(arguments)
    _configure_logging(args.verbose)
    module: Any = importlib.import_module(COMMANDS[args.command].module)
    try:
        code: int = module.run(args)
    except FlyboxError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        # An environment problem flybox did not anticipate (permissions, a full disk…):
        # one line naming the file, never a traceback.
        where = exc.filename or "flybox"
        log.error("%s: %s", where, exc.strerror or exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    return code


def entry() -> None:
    """The ``flybox`` console script: :func:`main`, then a quick exit.

    Tearing the interpreter down after a batch command (freeing pandas', pyarrow's and numba's
    state module by module) takes ~0.2 s here, 10 % of a typical ``flybox extract``. When the
    command has finished cleanly, with no child process and no non-daemon thread left, nothing
    remains to be done but flushing the output streams, so the process ends at once.
    Otherwise (a command that left workers or threads behind) it exits the normal way.
    """
    code = main()
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed or broken stream: let the interpreter report it
        sys.exit(code)
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if not multiprocessing.active_children() and all(t.daemon for t in others):
        os._exit(code)
    sys.exit(code)

"""``flybox demo``: the simulated microscope and the service on temporary folders."""

from __future__ import annotations

import argparse

DESCRIPTION = (
    "Run flybox simulate and flybox run together on temporary folders with built-in settings "
    "(1024² micrographs, 128-px particles + 64-px small set), show progress, and print a "
    "summary. Takes about a minute."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flybox demo``."""
    p.add_argument("--micrographs", type=int, default=20, metavar="N", help="how many")
    p.add_argument("--rate", type=float, default=30.0, metavar="PER_MIN", help="per minute")
    p.add_argument(
        "--keep",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="keep the folders in DIR (otherwise they are removed at the end)",
    )
    p.add_argument("--workers", type=int, default=2, metavar="N", help="worker processes")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its summary."""
    from flybox.sim.demo import run_demo

    keep = getattr(args, "keep", None)
    summary = run_demo(args.micrographs, args.rate, keep, workers=args.workers)
    print(summary.line())
    print(f"output: {summary.output}" if keep else "output removed (keep it with --keep DIR)")
    return 0 if summary.micrographs and not summary.failed else 1

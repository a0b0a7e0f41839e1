"""``flybox simulate OUT``: a synthetic microscope writing micrographs, picks and CTF."""

from __future__ import annotations

import argparse
import logging

DESCRIPTION = (
    "Write OUT/Micrographs/*.mrc (in place, in pieces, like acquisition software), "
    "OUT/AutoPick/*_autopick.star and OUT/micrographs_ctf.star at a rate."
)

log = logging.getLogger("flybox")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flybox simulate``."""
    p.add_argument("output", metavar="OUT", help="folder to write into")
    p.add_argument("--micrographs", type=int, default=20, metavar="N", help="how many")
    p.add_argument("--rate", type=float, default=30.0, metavar="PER_MIN", help="per minute")
    p.add_argument("--size", type=int, default=1024, metavar="PX", help="micrograph size")
    p.add_argument("--particles", type=int, default=100, metavar="N", help="per micrograph")
    p.add_argument("--pixel-size", type=float, default=1.0, metavar="A", help="in Å")
    p.add_argument("--seed", type=int, default=0, help="random seed")


def run(args: argparse.Namespace) -> int:
    """Write the synthetic session."""
    from pathlib import Path

    from flybox.sim.microscope import Acquisition, AcquisitionSettings

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

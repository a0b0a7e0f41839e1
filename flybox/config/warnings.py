"""Warnings about a valid configuration that will probably not do what its author wants:
watched folders or a CTF file that do not exist, a pixel size override that disagrees with the
CTF table or the MRC header. ``flybox config check`` prints them; ``flybox run`` logs them at
start (the configuration is still accepted: folders may appear later).
"""

from __future__ import annotations

import glob
import itertools

from flybox.config.models import FlyboxConfig
from flybox.errors import FlyboxError
from flybox.pipeline.checks import missing_input_warning, pixel_size_warning

__all__ = ["config_warnings"]


def _watched(config: FlyboxConfig) -> list[tuple[str, str]]:
    if config.watch is None:
        return []
    patterns = [(f"watch.micrographs[{i}]", p) for i, p in enumerate(config.watch.micrographs)]
    patterns += [(f"watch.coordinates[{i}]", p) for i, p in enumerate(config.watch.coordinates)]
    if config.watch.ctf is not None:
        patterns.append(("watch.ctf", config.watch.ctf))
    return patterns


def _first_micrograph(config: FlyboxConfig) -> str | None:
    if config.watch is None:
        return None
    for pattern in config.watch.micrographs:
        for path in itertools.islice(glob.iglob(pattern, recursive=True), 1):
            return path
    return None


def config_warnings(config: FlyboxConfig) -> list[str]:
    """Every warning about ``config`` (empty when nothing looks wrong).

    Reads at most one MRC header (the first micrograph already present) and the CTF table
    when it is a RELION STAR file that exists.
    """
    from flybox.io.ctf import read_micrographs_star
    from flybox.io.mrc import read_header

    warnings = [w for key, p in _watched(config) if (w := missing_input_warning(key, p))]
    if config.watch is not None and config.watch.ctf is None:
        warnings.append(
            "[watch] ctf is not set: the optics table will have no voltage, spherical aberration "
            "or amplitude contrast, and RELION 3.1 cannot read the particles without them"
        )
    given = config.micrograph.pixel_size
    if given is None:
        return warnings
    ctf = config.watch.ctf if config.watch is not None else None
    if ctf is not None and ctf.endswith(".star") and not glob.has_magic(ctf):
        try:
            _, groups, _ = read_micrographs_star(ctf)
        except (FlyboxError, OSError):
            groups = {}
        for group in groups.values():
            warning = pixel_size_warning(
                given,
                group.micrograph_pixel_size_a,
                "micrograph.pixel_size",
                f"the CTF table {ctf}",
            )
            if warning:
                warnings.append(warning)
                break
    first = _first_micrograph(config)
    if first is not None:
        try:
            header = read_header(first).pixel_size_a
        except (FlyboxError, OSError):
            header = None
        warning = pixel_size_warning(
            given, header, "micrograph.pixel_size", f"the MRC header of {first}"
        )
        if warning:
            warnings.append(warning)
    return warnings

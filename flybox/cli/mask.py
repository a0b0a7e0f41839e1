"""``flybox mask``: mask particle stacks, particle STAR files and volumes (DESIGN.md §7).

::

    flybox mask INPUT... -o OUT --shape SHAPE [shape parameters] [--center X Y [Z]]
                [--fill value|min|max|avg] [--fill-value V] [--mask FILE]
                [--convention relion|xmipp]

:func:`add_arguments` and :func:`run` implement the command; the library functions that do
the work (:func:`mask_stack_file`, :func:`mask_particles_star`, :func:`mask_volumes`) live in
:mod:`flybox.batch.mask` and are re-exported here. Everything is checked before anything is
written: a refused run leaves no file behind.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from flybox.batch.mask import (
    Masker,
    check_particles_star,
    check_stack_file,
    check_volume,
    mask_particles_star,
    mask_stack_file,
    mask_volumes,
)
from flybox.errors import ConfigError, FlyboxError, InputError, config_errors
from flybox.processors.mask import MaskSettings

__all__ = ["DESCRIPTION", "add_arguments", "masker_from_args", "run"]

DESCRIPTION = (
    "Apply a 2D mask to particle stacks / particle STAR files, or a 3D mask to volumes. "
    "Sizes and radii in pixels."
)

_VOLUME_SUFFIXES = (".mrc", ".map", ".ccp4", ".rec")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``flybox mask`` arguments and options to ``parser``."""
    parser.description = (
        "Mask particle stacks (.mrcs), particle STAR files or maps (.mrc/.map). Lengths are in "
        "pixels of the input images; -1 or omitting an option gives the Xmipp default. The "
        "mask centre is pixel N//2 on each axis, plus --center."
    )
    add = parser.add_argument
    # fmt: off
    add("inputs", nargs="+", metavar="INPUT",
        help=".mrcs stacks, particle .star files, or .mrc/.map volumes; glob patterns allowed")
    add("-o", "--output", required=True, metavar="OUT",
        help="output file (for one stack or volume) or folder (several inputs, or a STAR)")
    add("--shape", metavar="SHAPE",
        help="circular (alias sphere), box (rectangular), crown, cylinder (3D, axis along Z), "
        "gaussian, raised_cosine, raised_crown; required unless --mask is given")
    add("--radius", type=float, metavar="PX",
        help="radius of circular and cylinder [px; default: half the smallest box side]")
    add("--inner", type=float, metavar="PX",
        help="inner radius of crown, raised_cosine, raised_crown [px; default 0]")
    add("--outer", type=float, metavar="PX",
        help="outer radius of crown, raised_cosine, raised_crown "
        "[px; default: half the smallest box side]")
    add("--sigma", type=float, metavar="PX",
        help="gaussian sigma [px; default: smallest box side / 6]")
    add("--decay", type=float, metavar="PX",
        help="raised_crown soft-edge width [px; default 0]; relion: edges this wide outside "
        "[inner, outer]; xmipp: edges from radius-decay to radius+decay")
    add("--size", type=float, nargs="+", metavar="PX",
        help="box full side: one value, or X Y [Z] [px; default: half the box on each axis]")
    add("--height", type=float, metavar="PX",
        help="cylinder height along Z [px; default: the whole box]")
    add("--center", type=float, nargs="+", metavar="PX",
        help="X Y [Z] shift of the mask centre from the box centre N//2 [px; default 0 0 0]")
    add("--fill", choices=["value", "min", "max", "avg", "soft_background"],
        help="binary masks: pixels outside become --fill-value (value, default) or the min, "
        "max or avg of the image before masking; soft masks multiply. soft_background (any "
        "mask): RELION's blend towards the mean of the masked-out background")
    add("--fill-value", type=float, metavar="V", help="value for --fill value [default 0]")
    add("--mask", metavar="FILE",
        help="MRC mask multiplied in (times --shape if both); must match the images' size")
    add("--convention", choices=["relion", "xmipp"],
        help="relion (default): strict radii, soft edges outside [inner, outer], gaussian "
        "peak 1; xmipp: inclusive radii, soft edges centred on the radii, normalised gaussian")
    add("--gaussian-norm", choices=["peak", "density"],
        help="gaussian scaling: peak 1, or a normalised density [default: by convention]")
    add("--invert", action="store_true",
        help="keep the outside instead (Xmipp's outside mode, RELION's --invert)")
    # fmt: on


_SETTING_OPTIONS = (
    "radius", "inner", "outer", "sigma", "decay", "size", "height", "center",
    "fill", "fill_value", "convention", "gaussian_norm",
)  # fmt: skip


def masker_from_args(args: argparse.Namespace) -> Masker:
    """The :class:`Masker` described by parsed ``flybox mask`` options.

    Raises
    ------
    ConfigError
        Invalid or inconsistent options, named by option (``--radius: …``).
    """
    values = {name: getattr(args, name) for name in _SETTING_OPTIONS}
    values = {k: v for k, v in values.items() if v is not None}
    if args.invert:
        values["invert"] = True
    if args.shape is None:
        extra = sorted(set(values) - {"fill", "fill_value"})
        if args.mask is None:
            raise ConfigError("--shape", "required unless a mask file is given with --mask")
        if extra:
            raise ConfigError("--" + extra[0].replace("_", "-"), "needs --shape")
        return Masker(None, args.mask, fill=values.get("fill"), fill_value=values.get("fill_value"))
    try:
        settings = MaskSettings.model_validate({"shape": args.shape, **values})
    except ValidationError as exc:
        raise config_errors(exc, option_style=True)[0] from None
    return Masker(settings, args.mask)


def _expand(patterns: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise InputError(pattern, "no file matches this pattern")
            paths.extend(Path(m) for m in matches)
        elif not Path(pattern).is_file():
            raise InputError(pattern, "no such file")
        else:
            paths.append(Path(pattern))
    return list(dict.fromkeys(paths))


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".star":
        return "star"
    if suffix == ".mrcs":
        return "stack"
    if suffix in _VOLUME_SUFFIXES:
        return "volume"
    raise InputError(path, "unknown input type: expected .mrcs, .star, .mrc or .map")


def _plan(inputs: list[Path], output: Path) -> list[tuple[str, Path, Path]]:
    """(kind, input, output) per input; OUT is a file only for one stack/volume input."""
    kinds = [_kind(path) for path in inputs]
    if "star" in kinds and output.suffix.lower() == ".star":
        raise ConfigError("-o", "a STAR input needs an output folder, not a .star file")
    single_file = (
        len(inputs) == 1 and kinds[0] != "star" and not output.is_dir() and output.suffix != ""
    )
    plan = []
    seen: dict[Path, Path] = {}
    resolved_inputs = {path.resolve() for path in inputs}
    for kind, path in zip(kinds, inputs, strict=True):
        target = output if single_file else output / path.name
        key = target.resolve()
        if key in resolved_inputs:
            raise ConfigError("-o", f"would overwrite the input {path}")
        if key in seen:
            raise ConfigError("-o", f"{seen[key]} and {path} would both be written to {target}")
        seen[key] = path
        plan.append((kind, path, target))
    return plan


def run(args: argparse.Namespace) -> int:
    """Run ``flybox mask`` with parsed options; returns the exit status.

    Errors are reported as one line on stderr: status 2 for bad options, 1 for unusable
    inputs. Nothing is written when an input does not fit the mask.
    """
    try:
        masker = masker_from_args(args)
        plan = _plan(_expand(args.inputs), Path(args.output))
        _check_all(plan, masker)
        for kind, path, target in plan:
            if kind != "star":
                target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "stack":
                count = mask_stack_file(path, target, masker)
                print(f"{path} -> {target}: {count} particles masked")
            elif kind == "volume":
                mask_volumes([path], [target], masker)
                print(f"{path} -> {target}: masked")
            else:
                written = mask_particles_star(path, target.parent, masker)
                print(f"{path} -> {written}: particles masked")
    except ConfigError as exc:
        key = exc.key
        if key == "output":
            key = "-o"
        elif key in MaskSettings.model_fields:  # a settings field: name it as its option
            key = "--" + key.replace("_", "-")
        message = f"{key}: {exc.problem}" if key else exc.problem
        print(f"flybox mask: error: {message}", file=sys.stderr)
        return 2
    except FlyboxError as exc:
        print(f"flybox mask: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _check_all(plan: list[tuple[str, Path, Path]], masker: Masker) -> None:
    """Check every input against the mask before anything is written."""
    if not math.isfinite(masker.fill_value):
        raise ConfigError("--fill-value", "must be a finite number")
    for kind, path, target in plan:
        if kind == "star":
            check_particles_star(path, masker, target.parent)
        elif kind == "stack":
            check_stack_file(path, masker)
        else:
            check_volume(path, masker)

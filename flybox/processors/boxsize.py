"""FFT-friendly box sizes and box-size checks (ALGORITHMS.md §13, §1.2).

cryoSPARC's guide lists the box sizes it considers efficient; the list is curated (it is not
"every even 7-smooth number": 50, 98, 126 and 150 are absent), so it is shipped verbatim as
:data:`EFFICIENT_SIZES`. Beyond its last entry (4096) the rule "even and 7-smooth" applies.

RELION only needs even boxes; Xmipp/Scipion accept any size and derive defaults with
:func:`get_even`.
"""

from __future__ import annotations

import bisect
from typing import Literal

from flybox.errors import ConfigError

__all__ = [
    "EFFICIENT_SIZES",
    "check_box",
    "get_even",
    "is_efficient",
    "next_efficient_size",
    "suggest_box",
]

#: Efficient box sizes from cryoSPARC's "Extract from Micrographs" guide page, verbatim.
EFFICIENT_SIZES: tuple[int, ...] = (
    32, 36, 40, 42, 48, 56, 60, 64, 70, 72, 80, 84, 90, 96, 100, 108, 112, 120, 128, 144,
    160, 180, 192, 200, 216, 224, 240, 256, 270, 288, 300, 320, 324, 336, 384, 400, 432, 448,
    450, 512, 576, 640, 648, 672, 720, 768, 784, 810, 864, 882, 1024, 1152, 1280, 1296, 1344,
    1440, 1568, 1620, 1728, 1792, 2000, 2048, 2160, 2592, 2744, 3456, 4096,
)  # fmt: skip

_EFFICIENT_SET = frozenset(EFFICIENT_SIZES)


def _is_7_smooth(n: int) -> bool:
    if n < 1:
        return False
    for prime in (2, 3, 5, 7):
        while n % prime == 0:
            n //= prime
    return n == 1


def next_efficient_size(n: int) -> int:
    """Smallest efficient box size ``>= n``.

    Parameters
    ----------
    n
        Requested size in pixels.

    Returns
    -------
    int
        The smallest entry of :data:`EFFICIENT_SIZES` that is ``>= n`` (32 for anything up to
        32); beyond the table (n > 4096), the smallest even 7-smooth number ``>= n``.
    """
    index = bisect.bisect_left(EFFICIENT_SIZES, n)
    if index < len(EFFICIENT_SIZES):
        return EFFICIENT_SIZES[index]
    candidate = n + (n % 2)
    while not _is_7_smooth(candidate):
        candidate += 2
    return candidate


def is_efficient(n: int) -> bool:
    """Whether ``n`` is an efficient box size.

    Up to 4096 this means "listed in :data:`EFFICIENT_SIZES`"; beyond, "even and 7-smooth".
    """
    if n <= EFFICIENT_SIZES[-1]:
        return n in _EFFICIENT_SET
    return n % 2 == 0 and _is_7_smooth(n)


def get_even(x: float) -> int:
    """Scipion's ``getEven``: ``2·int(int(x)/2 + 0.75)``.

    Truncates ``x`` towards zero, then rounds an odd value **up** to the next even number
    (135.9 → 136, 270 → 270).
    """
    return 2 * int(int(x) / 2 + 0.75)


def suggest_box(picking_box_px: float) -> int:
    """Default extraction box for a picking box: ``next_efficient_size(get_even(1.5·b))``.

    Parameters
    ----------
    picking_box_px
        Box size used by the picker, in micrograph pixels.

    Returns
    -------
    int
        Scipion's default (1.5× the picking box, made even), moved up to the next
        FFT-efficient size; a 180-px picking box gives 270.
    """
    return next_efficient_size(get_even(1.5 * picking_box_px))


def check_box(box: int, *, convention: Literal["relion", "xmipp"], what: str = "box") -> list[str]:
    """Check a box size for a convention; return warnings, raise for unusable sizes.

    Parameters
    ----------
    box
        Box size in pixels.
    convention
        ``relion`` forbids odd sizes (ALGORITHMS.md §2); ``xmipp`` accepts them.
    what
        Configuration key of the size, used in messages and as the error's key.

    Returns
    -------
    list of str
        Warnings, e.g. ``"box 250 is not an FFT-efficient size; next efficient size is 256"``.

    Raises
    ------
    flybox.errors.ConfigError
        For ``box < 2``, or an odd box under the ``relion`` convention (the message suggests
        the next even efficient size).
    """
    if box < 2:
        raise ConfigError(key=what, problem=f"{what} {box} is too small (at least 2 pixels)")
    if convention == "relion" and box % 2 == 1:
        raise ConfigError(
            key=what,
            problem=(
                f"{what} {box} is odd, which RELION does not allow; "
                f"use an even size such as {next_efficient_size(box)}"
            ),
        )
    if is_efficient(box):
        return []
    return [
        f"{what} {box} is not an FFT-efficient size; next efficient size is "
        f"{next_efficient_size(box)}"
    ]

"""MRC/MRCS files: reading (headers, micrographs, stacks, volumes; memory-mapped where
possible) and crash-safe writing (ALGORITHMS.md §16).

The header parser is our own (numpy on the first 1024 bytes) so that checking a file that is
still being written costs one small read.
"""

from flybox.io.mrc.header import HEADER_BYTES
from flybox.io.mrc.read import (
    MrcCompleteness,
    MrcInfo,
    check_complete,
    read_header,
    read_micrograph,
    read_stack,
    read_volume,
)
from flybox.io.mrc.write import (
    StackWriter,
    relion_float16,
    write_micrograph,
    write_stack,
    write_volume,
)

__all__ = [
    "HEADER_BYTES",
    "MrcCompleteness",
    "MrcInfo",
    "StackWriter",
    "check_complete",
    "read_header",
    "read_micrograph",
    "read_stack",
    "read_volume",
    "relion_float16",
    "write_micrograph",
    "write_stack",
    "write_volume",
]

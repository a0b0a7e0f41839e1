"""FFTW wisdom on disk, shared by every flybox process of a host (plans measured once).

The file is ``$FLYBOX_CACHE_DIR/fftw-wisdom-<host>.bin`` (default ``$XDG_CACHE_HOME/flybox`` or
``~/.cache/flybox``; ``FLYBOX_CACHE_DIR=""`` turns the cache off). A missing, unreadable or
read-only cache only costs planning time, so no error escapes.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["FileWisdomStore", "default_wisdom_path"]


def default_wisdom_path() -> Path | None:
    """Where this host's wisdom lives, or ``None`` when the cache is turned off."""
    folder = os.environ.get("FLYBOX_CACHE_DIR")
    if folder is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        folder = os.path.join(base, "flybox")
    if not folder:
        return None
    return Path(folder) / f"fftw-wisdom-{platform.node() or 'host'}.bin"


class FileWisdomStore:
    """A :class:`flybox.processors.fft.WisdomStore` backed by one file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> tuple[bytes, ...] | None:
        """The saved wisdom (three FFTW wisdom strings), or ``None``."""
        try:
            if self.path is not None and self.path.is_file():
                parts = tuple(self.path.read_bytes().split(b"\0\0"))
                if len(parts) == 3:
                    return parts
        except OSError:
            pass
        return None

    def save(self, wisdom: tuple[bytes, ...]) -> None:
        """Write the wisdom atomically (temporary name, rename); failures are ignored."""
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temp.write_bytes(b"\0\0".join(wisdom))
            os.replace(temp, self.path)
        except OSError:
            pass  # read-only or full cache: only costs planning time next time

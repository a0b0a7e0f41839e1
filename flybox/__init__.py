"""flybox: on-the-fly particle extraction and masking for cryo-EM facilities."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

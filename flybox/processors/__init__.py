"""Pure array processing steps (no file I/O, no asyncio), and the plugin contract.

A step is a :class:`Processor` subclass with a pydantic :class:`StepSettings` model, registered
under the entry-point group ``flybox.processors`` (see :mod:`flybox.plugins`). Plugin authors
import what they need from here::

    from flybox.processors import ParticleProcessor, ParticleStack, StepSettings
"""

from flybox.processors.base import (
    MAIN_STREAM,
    Extractor,
    Micrograph,
    MicrographProcessor,
    ParticleProcessor,
    ParticleStack,
    Processor,
    StepKind,
    StepSettings,
    StreamSplitter,
    check_stream_name,
    scaled_radius,
)

__all__ = [
    "MAIN_STREAM",
    "Extractor",
    "Micrograph",
    "MicrographProcessor",
    "ParticleProcessor",
    "ParticleStack",
    "Processor",
    "StepKind",
    "StepSettings",
    "StreamSplitter",
    "check_stream_name",
    "scaled_radius",
]

"""Pure array processing steps (no file I/O, no asyncio); see :mod:`flybox.processors.base`."""

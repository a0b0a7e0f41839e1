"""flybox: on-the-fly particle extraction, masking and picking for cryo-EM facilities.

The public API, importable from here (the modules named below are where each name lives)::

    import flybox

    chain = flybox.Chain.from_config([{"step": "extract", "box": 256}])
    image, info = flybox.read_micrograph("MotionCorr/job002/mic.mrc")
    picks = flybox.read_coordinates("AutoPick/job004/mic_autopick.star")

Names are loaded on first use (PEP 562), so that ``import flybox`` (and every ``flybox``
command, which imports this package first) does not pay for numpy, pandas, pyFFTW and numba
before it needs them. Plugin authors find the step contract in :mod:`flybox.processors`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name → the module that defines it.
_API: dict[str, str] = {
    # errors (flybox.errors): the one exception tree
    "FlyboxError": "flybox.errors",
    "InputError": "flybox.errors",
    "IncompleteFileError": "flybox.errors",
    "MrcFormatError": "flybox.errors",
    "StarFormatError": "flybox.errors",
    "CoordinateFormatError": "flybox.errors",
    "CtfFormatError": "flybox.errors",
    "ConfigError": "flybox.errors",
    "PluginError": "flybox.errors",
    "ProcessingError": "flybox.errors",
    "TransientIOError": "flybox.errors",
    # value types
    "CtfParams": "flybox.types",
    "OpticsGroup": "flybox.types",
    # configuration
    "FlyboxConfig": "flybox.config",
    "load_config": "flybox.config",
    "parse_config": "flybox.config",
    # files
    "read_header": "flybox.io.mrc",
    "read_micrograph": "flybox.io.mrc",
    "read_stack": "flybox.io.mrc",
    "read_volume": "flybox.io.mrc",
    "write_micrograph": "flybox.io.mrc",
    "write_stack": "flybox.io.mrc",
    "write_volume": "flybox.io.mrc",
    "read_star": "flybox.io.star",
    "write_star": "flybox.io.star",
    "read_coordinates": "flybox.io.coords",
    "write_coordinates_star": "flybox.io.coords",
    "read_ctf": "flybox.io.ctf",
    # one micrograph through a chain
    "Chain": "flybox.pipeline.chain",
    "ChainSpec": "flybox.pipeline.chain",
    "StepSpec": "flybox.pipeline.chain",
    "MicrographJob": "flybox.pipeline.job",
    "JobResult": "flybox.pipeline.job",
    "run_job": "flybox.pipeline.job",
    # batch work
    "ExtractRequest": "flybox.batch.extract",
    "plan_extraction": "flybox.batch.extract",
    "run_extraction": "flybox.batch.extract",
    # the service
    "Service": "flybox.daemon.service",
}

# A literal list, so that linters and type checkers see it; a test keeps it equal to _API.
__all__ = [
    "Chain",
    "ChainSpec",
    "ConfigError",
    "CoordinateFormatError",
    "CtfFormatError",
    "CtfParams",
    "ExtractRequest",
    "FlyboxConfig",
    "FlyboxError",
    "IncompleteFileError",
    "InputError",
    "JobResult",
    "MicrographJob",
    "MrcFormatError",
    "OpticsGroup",
    "PluginError",
    "ProcessingError",
    "Service",
    "StarFormatError",
    "StepSpec",
    "TransientIOError",
    "__version__",
    "load_config",
    "parse_config",
    "plan_extraction",
    "read_coordinates",
    "read_ctf",
    "read_header",
    "read_micrograph",
    "read_stack",
    "read_star",
    "read_volume",
    "run_extraction",
    "run_job",
    "write_coordinates_star",
    "write_micrograph",
    "write_stack",
    "write_star",
    "write_volume",
]

if TYPE_CHECKING:
    from flybox.batch.extract import ExtractRequest, plan_extraction, run_extraction
    from flybox.config import FlyboxConfig, load_config, parse_config
    from flybox.daemon.service import Service
    from flybox.errors import (
        ConfigError,
        CoordinateFormatError,
        CtfFormatError,
        FlyboxError,
        IncompleteFileError,
        InputError,
        MrcFormatError,
        PluginError,
        ProcessingError,
        StarFormatError,
        TransientIOError,
    )
    from flybox.io.coords import read_coordinates, write_coordinates_star
    from flybox.io.ctf import read_ctf
    from flybox.io.mrc import (
        read_header,
        read_micrograph,
        read_stack,
        read_volume,
        write_micrograph,
        write_stack,
        write_volume,
    )
    from flybox.io.star import read_star, write_star
    from flybox.pipeline.chain import Chain, ChainSpec, StepSpec
    from flybox.pipeline.job import JobResult, MicrographJob, run_job
    from flybox.types import CtfParams, OpticsGroup


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'flybox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""The TOML configuration: pydantic models, validation with key paths, and the annotated
example (``flybox config example``).
"""

from flybox.config.example import (
    EXAMPLE_CONFIG,
)
from flybox.config.models import (
    DEFAULT_CHAIN,
    ExecutorConfig,
    FlyboxConfig,
    HttpConfig,
    MicrographConfig,
    MqttConfig,
    OutputConfig,
    PickingConfig,
    QualityRule,
    SessionConfig,
    WatchConfig,
    config_problems,
    load_config,
    parse_config,
)

__all__ = [
    "DEFAULT_CHAIN",
    "EXAMPLE_CONFIG",
    "ExecutorConfig",
    "FlyboxConfig",
    "HttpConfig",
    "MicrographConfig",
    "MqttConfig",
    "OutputConfig",
    "PickingConfig",
    "QualityRule",
    "SessionConfig",
    "WatchConfig",
    "config_problems",
    "load_config",
    "parse_config",
]

"""The TOML configuration, as pydantic models (DESIGN.md §5; the keys shown there are a contract).

``load_config(path)`` returns a validated :class:`FlyboxConfig` or raises
:class:`~flybox.errors.ConfigError` naming the key path of the first problem;
``config_problems(path)`` lists every problem (``flybox config check``). The ``[[chain]]``
tables are validated by building the processing chain, so unknown steps, bad settings and a
wrong step order are refused at start, never halfway through a session.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from flybox.errors import ConfigError, config_errors
from flybox.pipeline.chain import Chain, ChainSpec

__all__ = [
    "DEFAULT_CHAIN",
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

#: The chain used when a configuration has none: RELION-like extraction at 256 px with a
#: 64-px small set, ramp normalisation and inversion.
DEFAULT_CHAIN: list[dict[str, Any]] = [
    {"step": "extract", "box": 256, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 256, "particles_small": 64}},
    {"step": "normalize", "method": "ramp"},
    {"step": "invert"},
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SessionConfig(_Section):
    """``[session]``: the session's name, its output folder and the project folder that paths
    in STAR files are relative to (default: the working directory at start)."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    output: Path
    project_dir: Path | None = None
    #: A loop of the service (journal/commit, work; intake: at least twice its 60 s read
    #: timeout) that makes no progress for this long is reported stalled: status ``health``,
    #: ``/healthz`` answers 503 naming it.
    stall_seconds: float = Field(default=120.0, ge=1, le=86400, allow_inf_nan=False)

    def project_folder(self) -> Path:
        """The project folder, absolute (``project_dir``, else the working directory)."""
        from flybox.pipeline.layout import project_folder

        return project_folder(self.project_dir)


class WatchConfig(_Section):
    """``[watch]``: where inputs appear and how to watch them.

    Patterns are globs; ``**`` matches any number of folders.
    """

    micrographs: list[str] = Field(min_length=1)
    coordinates: list[str] = Field(default_factory=list)
    coordinate_suffix: str | None = None
    ctf: str | None = None
    mode: Literal["auto", "poll"] = "auto"
    #: Full scans this often (at least every 0.5 s: a scan walks the whole watched tree).
    rescan_seconds: float = Field(default=30.0, ge=0.5, le=86400, allow_inf_nan=False)
    #: A file must stay unchanged this long before it is used (at most an hour: longer
    #: would mean never).
    settle_seconds: float = Field(default=1.0, ge=0, le=3600, allow_inf_nan=False)
    #: A file that stays incomplete (MRC shorter than its header says, text that does not
    #: parse) this long without changing is quarantined.
    incomplete_timeout_seconds: float = Field(default=120.0, gt=0, allow_inf_nan=False)
    #: A complete micrograph whose coordinates (or CTF) have not come after this long is
    #: reported (it keeps waiting).
    pairing_timeout_seconds: float = Field(default=600.0, gt=0)


class MicrographConfig(_Section):
    """``[micrograph]``: pixel sizes in Å (default: from the MRC header)."""

    pixel_size: float | None = Field(default=None, gt=0)
    picking_pixel_size: float | None = Field(default=None, gt=0)


class OutputConfig(_Section):
    """``[output]``: particle stacks as float16 (RELION's mode 12 rules) instead of float32."""

    float16: bool = False


class ExecutorConfig(_Section):
    """``[executor]``: local worker processes, or a Dask cluster (docs/scaling.md)."""

    workers: int = Field(default=2, ge=1, le=512)
    #: ``"tcp://host:8786"`` (or ``tls://``): an existing Dask scheduler; ``"local"``: a Dask
    #: cluster of ``workers`` processes on this machine; absent: the local process pool.
    address: str | None = None
    #: On SIGTERM/SIGINT, in-flight micrographs get this long to finish; the rest are handed
    #: back to the journal (queued) for the next start.
    drain_seconds: float = Field(default=30.0, ge=0)
    #: Attempts per micrograph before it is marked failed (worker crashes, I/O errors,
    #: timeouts).
    max_attempts: int = Field(default=3, ge=1)
    #: A job that has not finished after this long (per 256 MiB of micrograph, at least once)
    #: is abandoned: its worker is stopped and replaced, and the attempt counts as failed (a
    #: micrograph on a hung mount must not hold a worker forever).
    job_timeout_seconds: float = Field(default=600.0, ge=1, le=86400, allow_inf_nan=False)

    @field_validator("address")
    @classmethod
    def _dask_address(cls, value: str | None) -> str | None:
        if value is None or value == "local":
            return value
        match = re.fullmatch(r"(tcp|tls)://([^:/\s]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", value)
        if match is None or not 0 < int(match.group(3)) < 65536:
            raise ValueError(
                f'{value!r} is not a Dask scheduler address: give "tcp://host:port" '
                '(e.g. "tcp://10.0.0.5:8786") or "local"'
            )
        return value


class MqttConfig(_Section):
    """``[mqtt]``: broker connection; absent means no MQTT."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, ge=1, le=65535)
    topic_prefix: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    outbox_limit: int = Field(default=10_000, ge=1)
    status_seconds: float = Field(
        default=10.0, gt=0, description="look at the status this often; publish it if changed"
    )
    flush_seconds: float = Field(
        default=5.0, ge=0, description="at stop, wait this long for the outbox to drain"
    )
    reconnect_max_seconds: float = Field(
        default=10.0, gt=0, description="longest wait between reconnection attempts"
    )

    @field_validator("topic_prefix")
    @classmethod
    def _topic_prefix_publishable(cls, value: str | None) -> str | None:
        # MQTT forbids wildcards and NUL in topics one publishes to: the broker would drop
        # the connection on every event.
        if value is not None:
            bad = sorted({c for c in value if c in "#+\0"})
            if bad:
                raise ValueError(
                    f"a topic to publish to cannot contain {', '.join(map(repr, bad))} "
                    "(MQTT wildcards)"
                )
            if not value.strip("/"):
                raise ValueError("an empty topic prefix; leave it out for flybox/<session>")
        return value


class HttpConfig(_Section):
    """``[http]``: the /metrics and /api/status listener (``host:port``)."""

    listen: str = "127.0.0.1:9464"
    token: SecretStr | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected host:port, got {value!r}")
        return value

    @property
    def host(self) -> str:
        """Host part of ``listen`` (brackets of an IPv6 literal removed)."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """Port part of ``listen``."""
        return int(self.listen.rpartition(":")[2])

    @property
    def is_loopback(self) -> bool:
        """Whether the listener is reachable only from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class PickingConfig(_Section):
    """``[picking]``: the service picks micrographs that have no external picks with a picker
    model (``flybox pick train`` or the picker), and learns from corrections made in ``/pick``.
    """

    model: Path = Field(description="a model file from `flybox pick train` or the picker")
    particle_size: float | None = Field(
        default=None, gt=0, le=4096, description="particle diameter in px; default: the model's"
    )
    learn: bool = Field(default=False, description="retrain from corrections during the session")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0, description="lowest score picked")


#: Per-micrograph figures a ``[[quality]]`` rule can test; ``particles.<stream>`` names one
#: stream (plain ``particles`` is the first stream of the chain).
QUALITY_FIGURES = (
    "picks",
    "particles",
    "excluded_border",
    "local_variance",
    "local_variance_median",
    "gini",
    "defocus",
    "border_fraction",
    "latency",
    "pick_score",
)
#: ``picks.<origin>``: the picks of one origin.
PICK_ORIGINS = ("auto", "manual", "external")

_CONDITION = re.compile(
    r"^\s*(?P<figure>[a-z_]+(?:\.[A-Za-z0-9_]+)?)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<threshold>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


class QualityRule(_Section):
    """``[[quality]]``: a rolling-window rule over committed micrographs.

    ``when = "particles < 50"``, ``count = 20``, ``window = 25`` fires an alert when at least
    20 of the last 25 micrographs had fewer than 50 particles, and clears it when fewer than
    20 of the last 25 do. Micrographs without the figure (e.g. no defocus) are not counted.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    when: str = Field(description="FIGURE OP NUMBER, e.g. 'particles < 50'")
    count: int = Field(ge=1)
    window: int = Field(ge=1, le=100_000)
    message: str | None = None

    @field_validator("when")
    @classmethod
    def _condition(cls, value: str) -> str:
        match = _CONDITION.match(value)
        if match is None:
            raise ValueError(f"expected 'FIGURE OP NUMBER' (e.g. 'particles < 50'), got {value!r}")
        figure = match["figure"]
        head, _, origin = figure.partition(".")
        if head not in QUALITY_FIGURES or (
            "." in figure
            and not figure.startswith("particles.")
            and not (head == "picks" and origin in PICK_ORIGINS)
        ):
            known = ", ".join((*QUALITY_FIGURES, "particles.<stream>", "picks.<origin>"))
            raise ValueError(f"unknown figure {figure!r}; known: {known}")
        return value

    @model_validator(mode="after")
    def _count_fits(self) -> QualityRule:
        if self.count > self.window:
            raise ValueError(f"count ({self.count}) is larger than window ({self.window})")
        return self

    def _parts(self) -> re.Match[str]:
        match = _CONDITION.match(self.when)
        if match is None:  # validated above
            raise ConfigError("quality.when", f"cannot parse {self.when!r}")
        return match

    @property
    def figure(self) -> str:
        """The per-micrograph figure tested (``particles``, ``particles.<stream>``, ``gini``…)."""
        return self._parts()["figure"]

    @property
    def operator(self) -> str:
        """The comparison: ``<``, ``<=``, ``>`` or ``>=``."""
        return self._parts()["op"]

    @property
    def threshold(self) -> float:
        """The number the figure is compared with."""
        return float(self._parts()["threshold"])


class FlyboxConfig(_Section):
    """The whole configuration file."""

    session: SessionConfig | None = None
    watch: WatchConfig | None = None
    micrograph: MicrographConfig = MicrographConfig()
    chain: list[dict[str, Any]] = Field(default_factory=lambda: [dict(s) for s in DEFAULT_CHAIN])
    output: OutputConfig = OutputConfig()
    executor: ExecutorConfig = ExecutorConfig()
    mqtt: MqttConfig | None = None
    http: HttpConfig = HttpConfig()
    quality: list[QualityRule] = Field(default_factory=list)
    picking: PickingConfig | None = None

    _built: tuple[ChainSpec, Chain] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _chain_builds(self) -> FlyboxConfig:
        self.build_chain()
        return self

    @model_validator(mode="after")
    def _workers_fit_the_machine(self) -> FlyboxConfig:
        # Local worker processes beyond a few per core only add memory and contention (each
        # holds a micrograph and FFT plans); a Dask scheduler's workers live elsewhere.
        cores = os.cpu_count() or 1
        if self.executor.address is None and self.executor.workers > 4 * cores:
            raise ConfigError(
                "executor.workers",
                f"{self.executor.workers} local worker processes on {cores} cores: at most "
                f"{4 * cores} (4 per core)",
            )
        return self

    @model_validator(mode="after")
    def _quality_names_unique(self) -> FlyboxConfig:
        names = [rule.name for rule in self.quality]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"quality rule name {name!r} is used twice")
        return self

    def build_chain(self) -> Chain:
        """The processing chain of this configuration (built and validated once, when the
        configuration was)."""
        spec = ChainSpec.of(self.chain)
        if self._built is None or self._built[0] != spec:
            self._built = (spec, Chain.from_config(spec))
        return self._built[1]


def _problems(data: dict[str, Any]) -> list[ConfigError]:
    try:
        FlyboxConfig.model_validate(data)
    except ValidationError as exc:
        return config_errors(exc)
    except ConfigError as exc:
        return [exc]
    return []


def _read_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        # No key: callers name the file (``FILE: problem``) once, for every problem alike.
        raise ConfigError("", f"cannot read the configuration: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"not valid TOML: {exc}") from exc


def parse_config(data: dict[str, Any]) -> FlyboxConfig:
    """Validate already-parsed TOML data.

    Raises
    ------
    ConfigError
        For the first problem, with its key path.
    """
    problems = _problems(data)
    if problems:
        raise problems[0]
    return FlyboxConfig.model_validate(data)


def load_config(path: str | Path) -> FlyboxConfig:
    """Read and validate a configuration file.

    Raises
    ------
    ConfigError
        When the file is unreadable, not TOML, or invalid (naming the key path).
    """
    return parse_config(_read_toml(path))


def config_problems(path: str | Path) -> list[ConfigError]:
    """Every problem of a configuration file, and every installed step plugin that does not
    load or validate (empty when all is well)."""
    from flybox.plugins.registry import plugin_errors

    try:
        problems = _problems(_read_toml(path))
    except ConfigError as exc:
        problems = [exc]
    return problems + list(plugin_errors().values())

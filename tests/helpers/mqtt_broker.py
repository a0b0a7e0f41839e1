"""Helpers for tests against real components: a mosquitto broker of our own, TLS files made
with the openssl CLI, free ports, a subscriber that collects messages, and the real service
(``python -m flybox run``) fed by the simulator.

Each broker runs on a free loopback port with its configuration, password file, certificates,
persistence and log in a temporary folder, so tests never touch a system broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from tests.conftest import REPO, require_binary


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
    """Wait until something accepts connections on ``host:port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s") from None
            time.sleep(0.05)


@dataclass(frozen=True)
class TlsFiles:
    """A test CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """Create a CA and server/client certificates with the ``openssl`` command."""
    openssl = require_binary("openssl")
    folder.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=folder)

    key = ["-newkey", "rsa:2048", "-nodes"]
    run("req", "-x509", *key, "-days", "2", "-subj", "/CN=flybox test CA",
        "-keyout", "ca.key", "-out", "ca.crt")  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extension in (("server", ["-extfile", "server.ext"]), ("client", [])):
        run("req", *key, "-subj", f"/CN=flybox test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")  # fmt: skip
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extension)  # fmt: skip
    return TlsFiles(
        ca=folder / "ca.crt",
        server_cert=folder / "server.crt",
        server_key=folder / "server.key",
        client_cert=folder / "client.crt",
        client_key=folder / "client.key",
    )


@dataclass
class Mosquitto:
    """A mosquitto broker of the test's own, on a free loopback port.

    ``users`` adds a password file (and refuses anonymous clients); ``tls`` makes the listener
    TLS-only and requires a client certificate signed by the test CA. Persistence is on, so
    persistent subscriber sessions survive :meth:`stop` + :meth:`start`.
    """

    folder: Path
    users: dict[str, str] = field(default_factory=dict)
    tls: TlsFiles | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
        self.binary = shutil.which("mosquitto", path=search) or require_binary("mosquitto")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = self.folder / "mosquitto.conf"
        self.log = self.folder / "mosquitto.log"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "persistence true",
            f"persistence_location {self.folder}/",
            f"log_dest file {self.log}",
            "log_type all",
        ]
        if os.geteuid() == 0:
            lines.append(f"user {getpass.getuser()}")
        if self.users:
            passwd = require_binary("mosquitto_passwd")
            passwords = self.folder / "passwords"
            passwords.touch(mode=0o600)
            for user, password in self.users.items():
                subprocess.run([passwd, "-b", str(passwords), user, password], check=True)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        if self.tls is not None:
            lines += [
                f"cafile {self.tls.ca}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
            ]
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> Mosquitto:
        """Start the broker and wait until it accepts connections."""
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the broker (SIGTERM: it saves its persistent sessions)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, **kwargs: Any) -> aiomqtt.Client:
        """An aiomqtt client for this broker (credentials and TLS filled in)."""
        if self.users and "username" not in kwargs:
            user, password = next(iter(self.users.items()))
            kwargs.update(username=user, password=password)
        if self.tls is not None:
            kwargs["tls_params"] = aiomqtt.TLSParameters(
                ca_certs=str(self.tls.ca),
                certfile=str(self.tls.client_cert),
                keyfile=str(self.tls.client_key),
            )
        return aiomqtt.Client("127.0.0.1", self.port, **kwargs)

    def subscriber_command(self, topic: str, *extra: str) -> list[str]:
        """A ``mosquitto_sub`` command line for this broker: lines ``RETAIN TOPIC PAYLOAD``."""
        command = [require_binary("mosquitto_sub"), "-h", "127.0.0.1", "-p", str(self.port)]
        command += ["-t", topic, "-q", "1", "-F", "%r %t %p", *extra]
        if self.users:
            user, password = next(iter(self.users.items()))
            command += ["-u", user, "-P", password]
        if self.tls is not None:
            command += ["--cafile", str(self.tls.ca), "--cert", str(self.tls.client_cert)]
            command += ["--key", str(self.tls.client_key)]
        return command


@dataclass
class Received:
    """One message a subscriber got."""

    topic: str
    payload: dict[str, Any]
    retain: bool


async def collect(
    client: aiomqtt.Client,
    done: Callable[[list[Received]], bool],
    timeout: float = 30.0,
) -> list[Received]:
    """Gather messages from a connected, subscribed client until ``done(messages)``."""
    received: list[Received] = []

    async def gather() -> None:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray)
            received.append(Received(str(message.topic), json.loads(payload), message.retain))
            if done(received):
                return

    if not done(received):
        try:
            await asyncio.wait_for(gather(), timeout)
        except TimeoutError:
            topics = [r.topic for r in received]
            raise AssertionError(f"timed out after {timeout} s; got {topics}") from None
    return received


def parse_sub_line(line: str) -> Received:
    """A ``mosquitto_sub -F '%r %t %p'`` output line."""
    retain, topic, payload = line.split(" ", 2)
    return Received(topic, json.loads(payload), retain == "1")


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Stop a child process we started (and reap it)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def mqtt_settings(broker: Mosquitto, **extra: Any) -> dict[str, Any]:
    """The ``[mqtt]`` section for a client of ``broker`` (credentials and TLS filled in)."""
    settings: dict[str, Any] = {"host": "127.0.0.1", "port": broker.port}
    if broker.users:
        user, password = next(iter(broker.users.items()))
        settings.update(username=user, password=password)
    if broker.tls is not None:
        settings.update(
            tls_ca=str(broker.tls.ca),
            tls_cert=str(broker.tls.client_cert),
            tls_key=str(broker.tls.client_key),
        )
    return settings | extra


def toml_text(data: dict[str, Any]) -> str:
    """TOML for a configuration made of tables and arrays of tables of plain values."""

    def literal(item: Any) -> str:
        if isinstance(item, dict):
            return "{ " + ", ".join(f"{k} = {literal(v)}" for k, v in item.items()) + " }"
        if isinstance(item, list):
            return "[" + ", ".join(literal(v) for v in item) + "]"
        return json.dumps(item)  # strings, numbers, booleans: the same in TOML

    def table(values: dict[str, Any]) -> list[str]:
        return [f"{key} = {literal(item)}" for key, item in values.items()]

    lines: list[str] = []
    for name, section in data.items():
        if isinstance(section, list):
            for entry in section:
                lines += [f"[[{name}]]", *table(entry)]
        else:
            lines += [f"[{name}]", *table(section)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the real service

#: A small, fast chain for service runs on two noisy cores.
SMALL_CHAIN: list[dict[str, Any]] = [
    {"step": "extract", "box": 64, "border": "fill"},
    {"step": "fourier_crop", "outputs": {"particles": 64, "particles_small": 32}},
    {"step": "normalize", "method": "ramp"},
]


@dataclass
class FlyboxRun:
    """``python -m flybox run -c CONFIG`` in its own process group, watching ``folder/in``
    (fed by :class:`flybox.sim.microscope.Acquisition`) and writing ``folder/out``; ``extra``
    adds configuration sections (``quality``…)."""

    folder: Path
    session: str
    mqtt: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    #: ``flybox -v run``: debug lines in the log.
    verbose: bool = False

    def __post_init__(self) -> None:
        self.inputs = self.folder / "in"
        self.output = self.folder / "out"
        self.log = self.folder / "service.log"
        for sub in ("Micrographs", "AutoPick"):
            (self.inputs / sub).mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = {
            "session": {"name": self.session, "output": str(self.output)},
            "watch": {
                "micrographs": [str(self.inputs / "Micrographs" / "*.mrc")],
                "coordinates": [str(self.inputs / "AutoPick" / "*_autopick.star")],
                "coordinate_suffix": "_autopick.star",
                "ctf": str(self.inputs / "micrographs_ctf.star"),
                "settle_seconds": 0.2,
                "rescan_seconds": 2.0,
            },
            "chain": SMALL_CHAIN,
            "executor": {"workers": 2},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
        }
        if self.mqtt is not None:
            data["mqtt"] = self.mqtt
        data.update(self.extra)
        self.config = self.folder / "flybox.toml"
        self.config.write_text(toml_text(data))

    @property
    def url(self) -> str:
        """The service's HTTP address."""
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> FlyboxRun:
        """Start the service and wait until its HTTP server answers."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "flybox",
                    *(["-v"] if self.verbose else []),
                    "run",
                    "-c",
                    str(self.config),
                ],
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None:
                raise AssertionError(f"flybox run exited: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"flybox run did not start: {self.log.read_text()}")
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Signal the service, wait for it, then end whatever is left of its process group
        (its workers); returns its exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        stop_process(process, sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return process.returncode

    def acquisition(self, micrographs: int, rate_per_minute: float) -> Any:
        """A simulated microscope writing into the watched folders (call ``.run()``)."""
        from flybox.sim.microscope import Acquisition, AcquisitionSettings

        settings = AcquisitionSettings(
            micrographs=micrographs,
            rate_per_minute=rate_per_minute,
            size=512,
            particles=30,
            chunks=2,
            chunk_pause_seconds=0.01,
            pool=min(micrographs, 4),
        )
        return Acquisition(self.inputs, settings)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``GET /metrics``, as {(sample name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def __enter__(self) -> FlyboxRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_prometheus(
    binary: str, target_port: int, folder: Path
) -> tuple[subprocess.Popen[Any], int]:
    """A real ``prometheus`` scraping ``127.0.0.1:target_port`` every second; returns the
    process and its web port (stop it with :func:`stop_process`)."""
    web_port = free_port()
    (folder / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: flybox\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web_port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, web_port


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    """The result vector of an instant query through Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success"
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result

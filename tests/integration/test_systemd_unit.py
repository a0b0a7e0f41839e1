"""The systemd unit (verify, sandboxing exposure) and the example service configuration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from flybox.config import load_config
from flybox.daemon.service import Service
from tests.conftest import REPO, require_binary

UNIT = REPO / "systemd" / "flybox@.service"


def _unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's flybox (verify checks it exists)."""
    flybox = Path(sys.executable).parent / "flybox"
    text = UNIT.read_text().replace("/opt/flybox/venv/bin/flybox", str(flybox))
    path = tmp_path / "flybox@.service"
    path.write_text(text)
    return path


def test_unit_is_a_notify_service_with_a_watchdog_and_restart() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "ExecStart=/opt/flybox/venv/bin/flybox run -c /etc/flybox/%i.toml",
        "User=flybox",
        "Restart=on-failure",
        "MemoryDenyWriteExecute=no",
    ):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+", text, re.MULTILINE)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    unit = _unit_for_this_machine(tmp_path)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_sandboxing_exposure_is_at_most_two(tmp_path: Path) -> None:
    analyze = require_binary("systemd-analyze")
    done = subprocess.run(
        [analyze, "security", "--offline=yes", str(_unit_for_this_machine(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert float(match.group(1)) <= 2.0


def test_example_service_configuration_is_valid_for_flybox_run() -> None:
    config = load_config(REPO / "systemd" / "krios1.toml")
    service = Service(config, telemetry=False)  # validates what flybox run needs; starts nothing
    assert service.session == "krios1-2026-11-21"
    assert service.watch.ctf is not None

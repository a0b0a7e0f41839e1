"""``flybox run -c CONFIG``: the streaming service in the foreground (systemd runs this)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

log = logging.getLogger("flybox")

DESCRIPTION = (
    "Watch the [watch] folders and extract particles of every complete micrograph with picks "
    "(and CTF, when a source is configured) into the [session] output folder, until "
    "SIGTERM/SIGINT. Restarts continue where the journal says."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flybox run``."""
    p.add_argument("-c", "--config", required=True, metavar="CONFIG", help="TOML configuration")


def _exit_cleanly(number: int, frame: Any) -> None:
    raise SystemExit(0)


def run(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM/SIGINT."""
    import signal

    # Until the service takes over SIGTERM/SIGINT (it then drains), a stop request while it
    # is still starting is a clean exit: nothing has been taken yet.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    from flybox.config import load_config
    from flybox.config.warnings import config_warnings
    from flybox.daemon.service import run
    from flybox.errors import ConfigError

    try:
        # Validated here too, so that errors and warnings name the file as `config check` does.
        config = load_config(args.config)
    except ConfigError as exc:
        log.error("%s: %s", args.config, exc)
        return 2
    for warning in config_warnings(config):
        log.warning("%s: %s", args.config, warning)
    try:
        return run(args.config)
    except ConfigError as exc:  # settings only `run` refuses (no [session], a Dask address…)
        log.error("%s: %s", args.config, exc)
        return 2

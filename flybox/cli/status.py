"""``flybox status``: a running service's status (GET URL/api/status)."""

from __future__ import annotations

import argparse
import logging
import os

from flybox.errors import FlyboxError

DESCRIPTION = "Print the session status of a running flybox service (GET URL/api/status)."

log = logging.getLogger("flybox")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flybox status``."""
    p.add_argument(
        "--url", default="http://127.0.0.1:9464", help="the service's [http] listen address"
    )
    p.add_argument(
        "--token",
        help="bearer token ([http] token) when the service requires one; "
        "default: the FLYBOX_TOKEN environment variable",
    )
    p.add_argument("--json", action="store_true", help="print the raw JSON report")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds to wait")


def run(args: argparse.Namespace) -> int:
    """Fetch and print the status; 1 when the service cannot be reached."""
    import shutil
    from urllib.parse import urlsplit

    from flybox.daemon.telemetry.status import fetch_status, render_status

    url = urlsplit(args.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        log.error(
            "--url %s: not an http:// or https:// address (e.g. http://127.0.0.1:9464)", args.url
        )
        return 2
    token = args.token or os.environ.get("FLYBOX_TOKEN") or None
    try:
        report = fetch_status(args.url, token, timeout=args.timeout)
    except FlyboxError as exc:
        log.error("%s", exc)
        return 1
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        width = max(shutil.get_terminal_size((120, 24)).columns, 80)
        print(render_status(report, width=width))
    return 0

"""``flybox pick``: the picker's commands (issue 11's CLI contract).

``serve`` (the web picker), ``train`` (a model from existing picks), ``auto`` (picks with a
model), ``summary`` (a session's summary), ``export`` (a session's picks as STAR, EMAN ``.box``
or Xmipp ``.pos``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flybox.errors import ConfigError, InputError

__all__ = ["DESCRIPTION", "add_arguments", "run"]

log = logging.getLogger("flybox")

DEFAULT_LISTEN = "127.0.0.1:8765"


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


DESCRIPTION = (
    "Pick particles in the browser (serve), train a picker on existing picks (train), pick "
    "with it (auto), and summarise or export a session."
)


def add_arguments(pick: argparse.ArgumentParser) -> None:
    """The subcommands and options of ``flybox pick``."""
    sub = pick.add_subparsers(dest="pick_command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve the picker's web page",
        description="Serve the picker on MICROGRAPHS (files or quoted globs, ** allowed); "
        "picks are saved in PICKDIR as they are made, and a restart on the same PICKDIR "
        "resumes. Stops on Ctrl-C / SIGTERM.",
    )
    serve.add_argument("micrographs", nargs="+", metavar="MICROGRAPHS")
    serve.add_argument("-o", "--output", required=True, metavar="PICKDIR", help="session folder")
    serve.add_argument(
        "--particle-size",
        type=_positive,
        metavar="PX",
        help="particle diameter in micrograph pixels (required for a new session)",
    )
    serve.add_argument("--picks", metavar="DIR", help="start from these picks (any format)")
    serve.add_argument("--picks-suffix", metavar="S", help="file-name ending of those picks")
    serve.add_argument(
        "--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT", help="default " + DEFAULT_LISTEN
    )
    serve.add_argument(
        "--token",
        help="bearer token for the API (required on a non-loopback listener); default: "
        "the FLYBOX_TOKEN environment variable",
    )

    train = sub.add_parser("train", help="train a picker model on existing picks")
    train.add_argument("--micrographs", required=True, metavar="GLOB")
    train.add_argument("--picks", required=True, metavar="DIR")
    train.add_argument("--picks-suffix", metavar="S")
    train.add_argument("--rejected", metavar="DIR", help="picks that are not particles")
    train.add_argument("--rejected-suffix", metavar="S")
    train.add_argument("--particle-size", required=True, type=_positive, metavar="PX")
    train.add_argument("-o", "--output", required=True, metavar="MODEL")

    auto = sub.add_parser("auto", help="pick micrographs with a trained model")
    auto.add_argument("--model", required=True, metavar="MODEL")
    auto.add_argument("--micrographs", required=True, metavar="GLOB")
    auto.add_argument("-o", "--output", required=True, metavar="DIR")
    auto.add_argument("--threshold", type=_fraction, default=0.5, metavar="T")

    summary = sub.add_parser("summary", help="print a picking session's summary")
    summary.add_argument("pickdir", metavar="PICKDIR")
    summary.add_argument("--json", action="store_true", help="print picking.json's summary")

    export = sub.add_parser("export", help="export a session's picks")
    export.add_argument("pickdir", metavar="PICKDIR")
    export.add_argument("--format", required=True, choices=("star", "box", "pos"))
    export.add_argument("-o", "--output", required=True, metavar="DIR")


def expand_micrographs(patterns: list[str]) -> list[Path]:
    """Files named or matched (``**`` recursive), sorted, without duplicates."""
    found: dict[str, None] = {}
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else []
        if not matches and Path(pattern).is_file():
            matches = [pattern]
        if not matches:
            raise InputError(pattern, "no micrograph matches")
        for match in matches:
            found.setdefault(match, None)
    return [Path(p) for p in found]


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError("--listen", f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    _StoppableServer = _stoppable_server_class()
    from flybox.pick.app import create_pick_app
    from flybox.pick.session import PickSession
    from flybox.pick.store import PickStore

    host, port = _listen(args.listen)
    token = args.token or os.environ.get("FLYBOX_TOKEN") or None
    if not _is_loopback(host) and token is None:
        raise ConfigError("--listen", f"{host} is not loopback: give --token to serve on it")
    store = PickStore(
        expand_micrographs(args.micrographs),
        Path(args.output),
        particle_size=args.particle_size,
        picks=Path(args.picks) if args.picks else None,
        picks_suffix=args.picks_suffix,
    )
    session = PickSession(store)
    app = create_pick_app(session, token=token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError("--listen", f"cannot listen on {args.listen}: {exc.strerror}") from exc
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}/" + (f"?token={token}" if token else "")
    summary = store.summary()
    print(
        f"flybox pick: {summary['micrograph_count']} micrographs, particle size "
        f"{store.particle_size:g} px, session {store.folder}",
        flush=True,
    )
    print(f"picker at {url}", flush=True)
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    _StoppableServer(config).run(sockets=[sock])
    log.info("picker stopped; session saved in %s", store.folder)
    return 0


def _stoppable_server_class() -> Any:
    import signal

    import uvicorn

    class StoppableServer(uvicorn.Server):
        """uvicorn's server, but SIGINT/SIGTERM end it cleanly (exit 0) instead of being
        raised again after the graceful shutdown, as uvicorn does."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            stops = (signal.SIGINT, signal.SIGTERM)
            previous = {number: signal.signal(number, self._stop) for number in stops}
            try:
                yield
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        def _stop(self, number: int, frame: Any) -> None:
            if self.should_exit and number == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    return StoppableServer


def _picks_folder(folder: str, suffix: str | None, names: list[str]) -> dict[str, Any]:
    from flybox.io.coords import read_coordinates

    base = Path(folder)
    if not base.is_dir():
        raise InputError(folder, "no such picks folder")
    suffixes = [suffix] if suffix else ["_manualpick.star", "_autopick.star", ".star", ".box"]
    suffixes += [".cbox", ".pos", ".txt"] if not suffix else []
    found: dict[str, Any] = {}
    for name in names:
        for s in suffixes:
            path = base / f"{name}{s}"
            if path.is_file():
                table = read_coordinates(path)
                found[name] = table[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(dtype=float)
                break
    return found


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from flybox.io.mrc import read_micrograph
    from flybox.pick.features import prepare
    from flybox.pick.learner import LabelledMicrograph, train
    from flybox.pick.model_file import save_model

    micrographs = expand_micrographs([args.micrographs])
    names = [p.stem for p in micrographs]
    positives = _picks_folder(args.picks, args.picks_suffix, names)
    rejected = (
        _picks_folder(args.rejected, args.rejected_suffix or "_discarded.star", names)
        if args.rejected
        else {}
    )
    examples = []
    for path in micrographs:
        if path.stem not in positives:
            continue
        data, _ = read_micrograph(path)
        examples.append(
            LabelledMicrograph(
                name=path.stem,
                prepared=prepare(data, args.particle_size),
                positives=positives[path.stem],
                negatives=rejected.get(path.stem, np.empty((0, 2))),
            )
        )
    if not examples:
        raise InputError(args.picks, "no picks for any of the micrographs")
    try:
        model = train(examples, args.particle_size)
    except ValueError as exc:
        raise InputError(args.picks, str(exc)) from exc
    save_model(args.output, model)
    log.info(
        "%s: trained on %d micrographs, %d particles, %d non-particles",
        args.output,
        len(examples),
        model.positives,
        len(model.labels) - model.positives,
    )
    return 0


def _auto(args: argparse.Namespace) -> int:
    import pandas as pd

    from flybox.errors import FlyboxError
    from flybox.io.coords import write_coordinates_star
    from flybox.io.mrc import read_micrograph
    from flybox.pick.features import prepare
    from flybox.pick.model_file import load_model

    model = load_model(args.model)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in expand_micrographs([args.micrographs]):
        try:
            data, _ = read_micrograph(path)
        except FlyboxError as exc:
            log.error("%s", exc)
            failed += 1
            continue
        proposals = model.propose(prepare(data, model.particle_size), min_score=args.threshold)
        table = pd.DataFrame(
            {
                "rlnCoordinateX": proposals.xy[:, 0],
                "rlnCoordinateY": proposals.xy[:, 1],
                "rlnAutopickFigureOfMerit": proposals.score,
            }
        )
        write_coordinates_star(out / f"{path.stem}_autopick.star", table)
        log.info("%s: %d picks", path.stem, len(proposals))
    return 1 if failed else 0


def _summary(args: argparse.Namespace) -> int:
    path = Path(args.pickdir) / "picking.json"
    try:
        session = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "no picking session here") from None
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a picking session ({exc})") from exc
    session.pop("micrographs", None)
    if args.json:
        print(json.dumps(session, indent=2))
        return 0
    needed = session.get("labels_needed", 0)
    lines = [
        ("particle size", f"{session.get('particle_size', 0):g} px"),
        ("manual picks", session.get("manual", 0)),
        ("automatic picks kept", session.get("automatic", 0)),
        ("discarded picks", session.get("discarded", 0)),
        ("autopick used", "yes" if session.get("autopick_used") else "no"),
        ("last micrograph", session.get("last_micrograph") or "-"),
        ("model version", session.get("model_version", 0)),
        ("enough labels", "yes" if not needed else f"no, {needed} more manual picks"),
    ]
    states = session.get("states", {})
    if states:
        lines.append(("micrographs", ", ".join(f"{n} {s}" for s, n in states.items())))
    for label, value in lines:
        print(f"{label + ':':<22}{value}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Run ``flybox pick <subcommand>``; returns the exit code."""
    if args.pick_command == "serve":
        return _serve(args)
    if args.pick_command == "train":
        return _train(args)
    if args.pick_command == "auto":
        return _auto(args)
    if args.pick_command == "summary":
        return _summary(args)
    if args.pick_command == "export":
        from flybox.pick.export import export_session

        written = export_session(Path(args.pickdir), args.format, Path(args.output))
        log.info("wrote %d files into %s", written, args.output)
        return 0
    print(f"unknown pick command {args.pick_command}", file=sys.stderr)
    return 2

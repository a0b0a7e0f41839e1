"""``flybox config check FILE`` and ``flybox config example``."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``flybox config``."""
    config_sub = p.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate FILE; print every error with its key path"
    )
    check.add_argument("file", metavar="FILE")
    config_sub.add_parser("example", help="print an annotated example configuration")


def run(args: argparse.Namespace) -> int:
    """Print the example, or every problem of FILE (exit 2 when there are any)."""
    from flybox.config import config_problems
    from flybox.config.example import EXAMPLE_CONFIG

    if args.config_command == "example":
        print(EXAMPLE_CONFIG, end="")
        return 0
    problems = config_problems(args.file)
    for problem in problems:
        print(f"error: {args.file}: {problem}", file=sys.stderr)
    if problems:
        return 2
    from flybox.config import load_config
    from flybox.config.warnings import config_warnings

    warnings = config_warnings(load_config(args.file))
    for warning in warnings:
        print(f"warning: {args.file}: {warning}", file=sys.stderr)
    print(f"{args.file}: ok" + (f" ({len(warnings)} warnings)" if warnings else ""))
    return 0

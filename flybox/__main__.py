"""``python -m flybox`` runs the command line."""

from flybox.cli import entry

entry()

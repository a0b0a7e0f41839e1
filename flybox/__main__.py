"""``python -m flybox`` runs the command line."""

from flybox.cli import main

raise SystemExit(main())

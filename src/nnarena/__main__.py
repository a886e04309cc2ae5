"""``python -m nnarena`` runs the CLI (local arena workers are started this way)."""

from nnarena.cli import main

main()

"""``python -m immune`` runs the ``immune`` command."""

from immune.cli import main

main()

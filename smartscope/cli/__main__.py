"""``python -m smartscope.cli`` runs the ``smartscope`` command."""

from smartscope.cli import main

main()
